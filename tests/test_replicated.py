"""Intervals over replicated processes, on simulated data with planted process offsets τ."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench.judge.replicated import (
    Estimate,
    Rounds,
    contrast_weight,
    mde,
    plan_for,
    saving,
    variance_components,
)
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


def test_variance_components_recover_the_planted_levels():
    rng = np.random.default_rng(3)
    effects = {f"c{i}": 0.0 for i in range(6)}
    rounds = simulate(rng, effects, processes=40, rounds=12, tau=0.02, sigma=0.01)
    found = variance_components(rounds)
    assert found.tau == pytest.approx(0.02, rel=0.2)
    assert found.sigma == pytest.approx(0.01, rel=0.1)
    assert found.processes == 40 and found.rounds_per_process == 12


def test_no_process_offset_reads_near_zero_tau():
    rng = np.random.default_rng(4)
    rounds = simulate(rng, {"a": 0.0, "b": 0.0, "c": 0.0}, 30, 10, tau=0.0, sigma=0.01)
    assert variance_components(rounds).tau < 0.004


def test_mde_by_hand():
    # SE = √(2·(0.01² + 0.02²/4)/5) = √(2·0.0002/5); df 4: t.975 = 2.7764, t.80 = 0.9410
    se = math.sqrt(2 * 0.0002 / 5)
    assert mde(0.01, 0.02, 5, 4) == pytest.approx(math.expm1((2.7764 + 0.9410) * se), rel=1e-3)
    assert math.isnan(mde(0.01, 0.02, 1, 4))  # one process cannot measure τ
    assert contrast_weight(1) == 2 and contrast_weight(3) == 8


def test_plan_uses_the_kalibera_jones_rounds_per_process():
    from bench.judge.replicated import Components

    components = Components(
        tau=0.01, sigma=0.03, processes=6, rounds_per_process=5, configurations=5
    )
    plan = plan_for(0.02, components, start_seconds=4.0, round_seconds=1.0)
    # K* = √(start·σ² / (round·τ²)) = √(4·9) = 6
    assert plan["rounds_per_process"] == 6
    p = plan["processes"]
    assert mde(0.01, 0.03, p, 6) <= 0.02 < mde(0.01, 0.03, p - 1, 6)
    assert plan["seconds"] == pytest.approx(p * (4 + 6))


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
