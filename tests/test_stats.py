"""Known-answer tests for bench.judge.stats on seeded synthetic rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.judge.stats import (
    DeltaEstimate,
    detects,
    joint_bootstrap,
    mde_for_rounds,
    mde_from_log_ratios,
    paired_accuracy_drop,
    paired_delta,
    summarize,
)


def rounds(factor: float, n: int = 30, sd: float = 0.03, drift_sd: float = 0.2, seed: int = 0):
    """Base and opt block values: shared per-round drift, independent lognormal noise."""
    rng = np.random.default_rng(seed)
    drift = rng.normal(0.0, drift_sd, n)
    base = 100.0 * np.exp(drift + rng.normal(0.0, sd, n))
    opt = 100.0 * factor * np.exp(drift + rng.normal(0.0, sd, n))
    return base, opt


# --- summarize ---------------------------------------------------------------------------


def test_summarize_known_values_and_noisy():
    s = summarize(np.arange(1, 101))  # linear interpolation percentiles, worked by hand
    assert s.n == 100
    assert s.median == pytest.approx(50.5)
    assert s.mean == pytest.approx(50.5)
    assert s.iqr == pytest.approx(75.25 - 25.75)
    assert s.p90 == pytest.approx(90.1)
    assert s.p99 == pytest.approx(99.01)
    assert s.rel_iqr == pytest.approx(49.5 / 50.5)
    assert s.noisy


def test_summarize_quiet_and_ignores_nan():
    s = summarize([104.0, 100.0, np.nan, 102.0, 101.0, 103.0])
    assert s.n == 5
    assert s.median == pytest.approx(102.0)
    assert s.iqr == pytest.approx(2.0)
    assert s.rel_iqr == pytest.approx(2.0 / 102.0)
    assert not s.noisy


def test_summarize_rejects_empty():
    with pytest.raises(ValueError, match="no finite"):
        summarize([np.nan])


# --- paired_delta --------------------------------------------------------------------------


def test_planted_delta_recovered():
    base, opt = rounds(0.95)
    est = paired_delta(base, opt)
    assert est.n_pairs == 30
    assert est.point == pytest.approx(0.05, abs=0.015)
    assert est.lo < 0.05 < est.hi
    assert est.lo < est.point < est.hi
    assert detects(est)


def test_pairing_cancels_drift():
    """Drift of 20% per round dwarfs a 5% effect; unpaired medians could not resolve it."""
    base, opt = rounds(0.95, drift_sd=0.2)
    est = paired_delta(base, opt)
    assert est.hi - est.lo < 0.04


def test_coverage_near_nominal():
    n_sets, true = 300, 0.05
    covered = 0
    for seed in range(n_sets):
        base, opt = rounds(1 - true, seed=seed)
        est = paired_delta(base, opt, n_resamples=1000, seed=seed, method="percentile")
        covered += est.lo <= true <= est.hi
    assert 0.90 <= covered / n_sets <= 0.985


def test_aa_null_not_detected():
    base, opt = rounds(1.0, sd=0.01, seed=7)
    est = paired_delta(base, opt)
    assert est.lo < 0 < est.hi
    assert not detects(est)


def test_five_percent_at_one_percent_noise_detected():
    base, opt = rounds(0.95, sd=0.01, seed=3)
    assert detects(paired_delta(base, opt))


def test_slowdown_is_negative_saving():
    base, opt = rounds(1.10, sd=0.01, seed=4)
    est = paired_delta(base, opt)
    assert est.point == pytest.approx(-0.10, abs=0.01)
    assert est.hi < 0 and detects(est)


def test_identical_values_fall_back_cleanly():
    est = paired_delta([2.0, 3.0, 4.0], [1.0, 1.5, 2.0])  # every ratio exactly 0.5
    assert (est.point, est.lo, est.hi) == pytest.approx((0.5, 0.5, 0.5))


def test_missing_rounds_dropped():
    base, opt = rounds(0.95)
    base[[2, 5]] = np.nan
    opt[9] = np.nan
    est = paired_delta(base, opt)
    assert est.n_pairs == 27
    assert est.lo < 0.05 < est.hi


@pytest.mark.parametrize(
    ("base", "opt", "match"),
    [
        ([1.0, 2.0], [1.0, 0.0], "> 0"),
        ([1.0, -2.0], [1.0, 1.0], "> 0"),
        ([1.0, 2.0, 3.0], [1.0, 2.0], "same length"),
        ([1.0, np.nan], [1.0, 2.0], "at least 2"),
    ],
)
def test_paired_delta_rejects_bad_input(base, opt, match):
    with pytest.raises(ValueError, match=match):
        paired_delta(base, opt)


def test_detects_on_hand_made_estimates():
    assert detects(DeltaEstimate(0.02, 0.01, 0.03, 30, 0.95))
    assert detects(DeltaEstimate(-0.02, -0.03, -0.01, 30, 0.95))
    assert not detects(DeltaEstimate(0.01, -0.01, 0.03, 30, 0.95))
    assert not detects(DeltaEstimate(math.nan, math.nan, math.nan, 30, 0.95))


# --- joint_bootstrap -------------------------------------------------------------------------


def test_joint_bootstrap_matches_paired_delta():
    """Same statistic, seed and method give the same interval (up to BCa details: percentile
    interpolation and jackknife acceleration run on different scales in the two paths)."""
    base, opt = rounds(0.9, seed=11)
    direct = paired_delta(base, opt, seed=5)
    joint = joint_bootstrap(
        {"b": base, "o": opt},
        lambda c: -np.expm1(np.mean(np.log(c["o"] / c["b"]), axis=-1)),
        seed=5,
    )
    assert joint.point == pytest.approx(direct.point)
    assert joint.lo == pytest.approx(direct.lo, abs=1e-4)
    assert joint.hi == pytest.approx(direct.hi, abs=1e-4)


def test_joint_bootstrap_resamples_rounds_jointly():
    """a − b is constant per round, so a joint resample has no spread; independent would."""
    rng = np.random.default_rng(0)
    a = rng.normal(10.0, 1.0, 30)
    est = joint_bootstrap({"a": a, "b": a - 2.0}, lambda c: np.mean(c["a"] - c["b"], axis=-1))
    assert (est.point, est.lo, est.hi) == pytest.approx((2.0, 2.0, 2.0))


def test_joint_bootstrap_drops_rounds_missing_anywhere():
    a, b = np.arange(1.0, 11.0), np.arange(1.0, 11.0)
    c = np.arange(1.0, 11.0)
    b[0], c[4] = np.nan, np.nan
    est = joint_bootstrap({"a": a, "b": b, "c": c}, lambda d: np.mean(d["a"], axis=-1))
    assert est.n_pairs == 8
    assert est.point == pytest.approx(np.mean([2, 3, 4, 6, 7, 8, 9, 10]))


# --- MDE -------------------------------------------------------------------------------------


def test_mde_hand_computation():
    # z_{0.975} = 1.959964, z_{0.8} = 0.841621; m = 2.801585 * 0.03 / sqrt(30) = 0.0153449
    assert mde_for_rounds(0.03, 30) == pytest.approx(math.expm1(0.0153449), rel=1e-4)
    # alpha 0.10, power 0.9: (1.644854 + 1.281552) * 0.01 / 2 = 0.0146320
    assert mde_for_rounds(0.01, 4, alpha=0.10, power=0.9) == pytest.approx(
        math.expm1(0.0146320), rel=1e-4
    )


def test_mde_from_log_ratios_uses_sample_sd():
    d = np.array([0.01, -0.01, 0.02, -0.02])  # sd (ddof=1) = sqrt(0.001/3)
    expected = math.expm1(2.801585 * math.sqrt(0.001 / 3) / 2)
    assert mde_from_log_ratios(d) == pytest.approx(expected, rel=1e-5)


def test_mde_shrinks_with_rounds():
    assert mde_for_rounds(0.03, 120) == pytest.approx(mde_for_rounds(0.03, 30) / 2, rel=0.01)


# --- accuracy ------------------------------------------------------------------------------


def test_paired_accuracy_drop():
    base = np.ones(1000, dtype=bool)
    base[:200] = False  # 80% accurate
    opt = base.copy()
    opt[200:250] = False  # loses 50 examples: 5 points
    est = paired_accuracy_drop(base, opt)
    assert est.point == pytest.approx(0.05)
    assert est.n_pairs == 1000
    assert 0.03 < est.lo < 0.05 < est.hi < 0.07


def test_paired_accuracy_drop_is_paired():
    """Same accuracy, different examples right: no drop, but the CI must not be zero-width."""
    base = np.zeros(400, dtype=bool)
    base[:200] = True
    opt = ~base
    est = paired_accuracy_drop(base, opt)
    assert est.point == pytest.approx(0.0)
    assert est.lo < -0.05 and est.hi > 0.05
