"""Variance components, the planner and the sequential rule, on synthetic samples whose
components, plans and error rates are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.judge.components import variance_components
from bench.judge.planning import contrast_weight, factor, plan_for, resolution
from bench.judge.replicated import Rounds
from bench.judge.sequential import boundaries, look_confidence, look_points, spent
from bench.judge.simulate import error_rates


def synthetic(
    rng: np.random.Generator,
    configurations: int,
    processes: int,
    rounds: int,
    *,
    round_sd: float,
    tau: float,
    sigma: float,
    stalls: float = 0.0,
) -> Rounds:
    """log y = ρ(round) + τ·z(config, process) + σ·z(block), plus a share `stalls` of blocks
    made 30–80% slower (the heavy right tail of a shared machine)."""
    shape = (processes, rounds)
    shared = round_sd * rng.standard_normal(shape)
    table = {}
    for c in range(configurations):
        offset = tau * rng.standard_normal(processes)[:, None]
        noise = sigma * rng.standard_normal(shape)
        noise += (rng.random(shape) < stalls) * rng.uniform(0.3, 0.8, shape)
        table[f"c{c}"] = np.exp(shared + offset + noise).ravel()
    frame = pd.DataFrame(table)
    epochs = pd.Series(np.repeat(np.arange(processes), rounds), index=frame.index)
    return Rounds(frame, epochs)


def test_components_recover_the_planted_round_effect_offset_and_block_noise():
    rng = np.random.default_rng(11)
    rounds = synthetic(rng, 5, 40, 20, round_sd=0.08, tau=0.02, sigma=0.05)
    found = variance_components(rounds)
    assert found.round_sd == pytest.approx(0.08, rel=0.1)
    assert found.tau == pytest.approx(0.02, rel=0.25)
    assert found.sigma == pytest.approx(0.05, rel=0.05)
    assert found.sigma_robust == pytest.approx(0.05, rel=0.1)
    assert found.tail_share == pytest.approx(0.25, abs=0.04)  # a normal sample's share
    assert abs(found.excess_kurtosis) < 0.3
    assert (found.processes, found.rounds_per_process, found.configurations) == (40, 20, 5)
    assert set(found.methods) >= {"round_sd", "tau", "sigma", "sigma_effective", "tail_share"}


def test_no_offset_reads_near_zero_tau():
    rng = np.random.default_rng(12)
    rounds = synthetic(rng, 4, 30, 12, round_sd=0.05, tau=0.0, sigma=0.03)
    assert variance_components(rounds).tau < 0.005


def test_stalls_show_as_tail_weight_and_the_trimmed_mean_sees_less_noise():
    rng = np.random.default_rng(13)
    rounds = synthetic(rng, 4, 20, 30, round_sd=0.05, tau=0.0, sigma=0.03, stalls=0.05)
    found = variance_components(rounds)
    assert found.tail_share > 0.5 and found.excess_kurtosis > 3
    assert found.beyond_3_robust_sd > 0.03
    # the trimmed mean behaves nearly as if the stalls were not there; the mean does not
    assert found.sigma_effective < 0.6 * found.sigma
    # the location SD the planner relies on is what the processes really show
    assert found.location_sd == pytest.approx(found.sigma_effective / math.sqrt(30), rel=0.3)


def test_components_refuse_a_run_too_small_to_separate_them():
    rng = np.random.default_rng(14)
    with pytest.raises(ValueError, match="at least 2 configurations, 2 processes"):
        variance_components(synthetic(rng, 1, 5, 5, round_sd=0.1, tau=0.0, sigma=0.1))


def test_contrast_weight_and_resolution_by_hand():
    assert contrast_weight(1) == 2  # A against B
    assert contrast_weight(3) == 1 + 3 + 4  # stack − Σ singles + 2·baseline
    se, p = 0.004, 12
    expected = math.expm1((stats.t.ppf(0.975, 11) + stats.t.ppf(0.8, 11)) * se)
    assert resolution(se, p) == pytest.approx(expected)
    assert resolution(se, p, detect=False) == pytest.approx(math.expm1(factor(p, False) * se))
    assert math.isnan(resolution(se, 1))


def test_plan_is_the_fastest_design_that_reaches_the_target():
    rng = np.random.default_rng(15)
    components = variance_components(synthetic(rng, 5, 12, 20, round_sd=0.05, tau=0.01, sigma=0.05))
    weight, target = contrast_weight(3), 0.02
    plan = plan_for(target, components, weight, process_seconds=3.0, round_seconds=0.5)
    assert plan.expected is not None and plan.expected <= target
    assert plan.seconds == pytest.approx(plan.processes * (3.0 + plan.rounds_per_process * 0.5))
    # brute force: no cheaper (P, K) reaches the target
    for p in range(3, 60):
        for k in range(2, 400):
            if resolution(components.contrast_se(weight, p, k), p) <= target:
                assert p * (3.0 + k * 0.5) >= plan.seconds - 1e-9
                break


def test_plan_says_when_no_design_reaches_the_target():
    rng = np.random.default_rng(16)
    components = variance_components(synthetic(rng, 3, 10, 10, round_sd=0.0, tau=0.05, sigma=0.01))
    plan = plan_for(0.001, components, 8, 1.0, 1.0, max_processes=20)
    assert plan.processes is None and plan.seconds is None


def test_spending_by_hand():
    assert spent(1.0) == pytest.approx(0.05)
    assert spent(0.5) == pytest.approx(2 - 2 * stats.norm.cdf(1.959964 / math.sqrt(0.5)))
    assert spent(0.0) == 0.0
    assert look_points(12) == (6, 9, 12)
    assert look_points(3) == (2, 3)


def test_one_look_at_the_end_is_the_fixed_t_interval_and_earlier_looks_widen_the_last():
    c = boundaries((10,), 10)[0]
    assert c == pytest.approx(stats.t.ppf(0.975, 9), rel=0.01)
    # after looks at 5 and 8 processes the last interval is a little wider than 95%
    assert 0.955 < look_confidence(10, 10, final=True) < 0.975


def test_looks_keep_the_overall_error_on_fresh_simulated_runs():
    """20,000 null runs of 12 processes each, not the boundaries' own paths: the share that
    crosses at any look is α, and the last look is only a little wider than a fixed one."""
    looks = look_points(12)
    critical = boundaries(looks, 12)
    rng = np.random.default_rng(17)
    x = rng.standard_normal((20_000, 12)) * 0.7  # any scale: the statistic is studentized
    crossed = np.zeros(x.shape[0], dtype=bool)
    for k, c in zip(looks, critical, strict=True):
        part = x[:, :k]
        t = np.abs(part.mean(axis=1)) / (part.std(axis=1, ddof=1) / math.sqrt(k))
        crossed |= t >= c
    assert crossed.mean() == pytest.approx(0.05, abs=0.005)
    assert stats.t.ppf(0.975, 11) < critical[-1] < 1.1 * stats.t.ppf(0.975, 11)


def test_look_confidence_refuses_a_look_that_was_not_planned():
    with pytest.raises(ValueError, match="no look is planned"):
        look_confidence(7, 12, final=False)
    assert look_confidence(6, 12, final=False) > 0.99  # an early look is wide


def test_simulated_judge_keeps_its_coverage_at_known_components():
    rng = np.random.default_rng(18)
    components = variance_components(synthetic(rng, 5, 12, 20, round_sd=0.08, tau=0.01, sigma=0.05))
    rates = error_rates(components, None, processes=8, rounds=10, runs=150, seed=3)
    assert 0.88 <= rates.singles_covered <= 1.0
    assert 0.87 <= rates.residual_covered <= 1.0
    assert rates.aa_departures <= 0.12
    assert rates.sequential_wrong_at_zero <= 0.12
    assert rates.looks == [4, 6, 8]
    assert "simulated 150 runs of 8 processes" in rates.line()
