"""Intervals over replicated processes, on simulated data with planted process offsets τ."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench.judge.replicated import Estimate, Rounds, locations, saving, trimmed_mean
from bench.judge.suite_verdict import holm
from bench.judge.verdict import departure


def simulate(
    rng: np.random.Generator,
    effects: dict[str, float],
    processes: int,
    rounds: int,
    tau: float,
    sigma: float,
) -> Rounds:
    """log y = log(1 − effect) + drift(round) + τ·z(config, process) + σ·z(round)."""
    epochs = np.repeat(np.arange(processes), rounds)
    drift = 0.05 * rng.standard_normal(epochs.size)
    table = {}
    for name, effect in effects.items():
        offset = tau * rng.standard_normal(processes)[epochs]
        noise = sigma * rng.standard_normal(epochs.size)
        table[name] = np.exp(np.log1p(-effect) + drift + offset + noise)
    frame = pd.DataFrame(table)
    return Rounds(frame, pd.Series(epochs, index=frame.index))


def test_process_level_interval_covers_the_truth_and_the_round_interval_does_not():
    rng = np.random.default_rng(1)
    effects = {"base": 0.0, "opt": 0.05}
    covered = round_only_covered = 0
    trials = 200
    for _ in range(trials):
        rounds = simulate(rng, effects, processes=6, rounds=10, tau=0.015, sigma=0.01)
        est = saving(rounds, "base", "opt")
        covered += est.lo <= 0.05 <= est.hi
        one_process = Rounds(rounds.table, pd.Series(0, index=rounds.table.index))
        one = saving(one_process, "base", "opt")  # as if all rounds came from one process
        round_only_covered += one.lo <= 0.05 <= one.hi
    assert 0.91 <= covered / trials <= 0.99
    # rounds inside a process are pseudo-replicates of its offset: far too narrow
    assert round_only_covered / trials < 0.7


def test_one_process_falls_back_to_rounds_and_says_so():
    rng = np.random.default_rng(2)
    rounds = simulate(rng, {"base": 0.0, "opt": 0.1}, processes=1, rounds=20, tau=0, sigma=0.01)
    est = saving(rounds, "base", "opt")
    assert not est.includes_process_variance and est.processes == 1
    assert "excludes process variance" in est.method
    assert est.lo < 0.1 < est.hi


def test_trimmed_mean_matches_scipy_and_ignores_missing_values():
    from scipy import stats

    values = np.array([5.0, 1.0, np.nan, 3.0, 100.0, 2.0, 4.0, 0.5, 7.0, 6.0, 8.0])
    finite = values[np.isfinite(values)]
    assert trimmed_mean(values, 0.2) == pytest.approx(stats.trim_mean(finite, 0.2))
    assert math.isnan(trimmed_mean(np.array([np.nan])))


def test_locations_are_one_row_per_process_and_keep_only_complete_rounds():
    rng = np.random.default_rng(6)
    rounds = simulate(rng, {"a": 0.0, "b": 0.1, "c": 0.2}, 4, 10, tau=0.0, sigma=0.01)
    rounds.table.iloc[3, 1] = np.nan  # one block of b in process 0 is missing
    located = locations(rounds)
    assert list(located.table.index) == [0, 1, 2, 3]
    assert located.round_count == 39
    assert located.table.shape == (4, 3)
    # the round centring leaves the ratios, not the levels
    assert (located.table["b"] / located.table["a"]).mean() == pytest.approx(0.9, rel=0.02)


def test_located_saving_is_unbiased_and_narrower_under_stalls():
    """Block noise with stalls (5% of blocks 30–80% slower, hitting one configuration at a
    time) over a large shared round effect: the trimmed, round-centred location recovers a
    5% saving, with a much narrower interval than the mean of raw per-round ratios."""
    rng = np.random.default_rng(7)
    points, located_widths, raw_widths = [], [], []
    for _ in range(60):
        epochs = np.repeat(np.arange(8), 20)
        round_effect = 0.08 * rng.standard_normal(epochs.size)
        table = {}
        for name, effect in {"base": 0.0, "opt": 0.05}.items():
            stall = rng.random(epochs.size) < 0.05
            noise = 0.03 * rng.standard_normal(epochs.size)
            noise += stall * rng.uniform(0.3, 0.8, epochs.size)
            table[name] = np.exp(np.log1p(-effect) + round_effect + noise)
        frame = pd.DataFrame(table)
        rounds = Rounds(frame, pd.Series(epochs, index=frame.index))
        located = saving(locations(rounds), "base", "opt")
        raw = saving(rounds, "base", "opt")
        points.append(located.point)
        located_widths.append(located.hi - located.lo)
        raw_widths.append(raw.hi - raw.lo)
    assert np.mean(points) == pytest.approx(0.05, abs=0.002)
    assert np.mean(located_widths) < 0.75 * np.mean(raw_widths)


def _interval(lo: float, hi: float) -> Estimate:
    return Estimate((lo + hi) / 2, lo, hi, 0.01, 5, 6, 60, "test", True)


@pytest.mark.parametrize(
    ("lo", "hi", "outcome"),
    [
        (-0.01, 0.015, "within"),
        (0.005, 0.015, "within"),  # resolved but smaller than the margin
        (-0.05, -0.025, "below"),
        (0.021, 0.06, "above"),
        (-0.03, 0.01, "inconclusive"),  # contains 0 but is wider than the margin
    ],
)
def test_equivalence_outcomes(lo, hi, outcome):
    judged = departure(_interval(lo, hi), margin=0.02)
    assert judged.outcome == outcome
    assert judged.margin_needed == pytest.approx(max(abs(lo), abs(hi)))


def test_holm_by_hand():
    adjusted = holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3])


def test_interaction_ratio_interval_covers_the_planted_ratio():
    """Singles save 10% and 20%; the stack costs 5% more than their product (ratio 1.05)."""
    from bench.judge.verdict import metric_verdict

    rng = np.random.default_rng(5)
    ratio = 1.05
    effects = {"base": 0.0, "a": 0.10, "b": 0.20, "a+b": 1 - 0.9 * 0.8 * ratio}
    covered, trials = 0, 150
    for _ in range(trials):
        rounds = simulate(rng, effects, processes=6, rounds=8, tau=0.01, sigma=0.01)
        row = metric_verdict("latency", "s", rounds, "base", ["a", "b"], "a+b")
        covered += row.interaction_ratio.lo <= ratio <= row.interaction_ratio.hi
    assert 0.90 <= covered / trials <= 0.99
