"""Statistics for block-level measurements: summaries, paired savings with bootstrap CIs, MDE.

Configurations are measured in rounds (every configuration runs one block per round, in a
shuffled order), so values of different configurations are paired by round index. Pairing
cancels drift shared within a round; that is why every comparison here works on per-round
log ratios and bootstraps over whole rounds. A round that is NaN for any configuration in a
comparison is dropped from that comparison.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

NOISY_REL_IQR = 0.10
DEFAULT_RESAMPLES = 2000
BCA_MAX_N = 500

# scipy >= 1.15 takes `rng`; older releases only `random_state`.
_RNG_KW = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


@dataclass(frozen=True)
class Summary:
    """Robust description of one configuration's block values (torch.utils.benchmark style)."""

    n: int
    median: float
    mean: float
    iqr: float
    p90: float
    p99: float
    rel_iqr: float
    noisy: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeltaEstimate:
    """A point estimate with its bootstrap CI; `n_pairs` counts the paired rounds (or examples)."""

    point: float
    lo: float
    hi: float
    n_pairs: int
    confidence: float
    method: str = "BCa"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(values: ArrayLike, noisy_threshold: float = NOISY_REL_IQR) -> Summary:
    """Median, IQR, tails and a noisy flag; NaNs (missing blocks) are ignored."""
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        raise ValueError("summarize: no finite values")
    q25, median, q75, p90, p99 = np.percentile(x, [25, 50, 75, 90, 99])
    iqr = float(q75 - q25)
    rel_iqr = _safe_ratio(iqr, abs(float(median)))
    return Summary(
        n=int(x.size),
        median=float(median),
        mean=float(np.mean(x)),
        iqr=iqr,
        p90=float(p90),
        p99=float(p99),
        rel_iqr=rel_iqr,
        noisy=bool(rel_iqr > noisy_threshold),
    )


def _safe_ratio(num: float, den: float) -> float:
    """num/den where a zero median with zero spread counts as perfectly quiet."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _paired_matrix(columns: Mapping[str, ArrayLike]) -> tuple[list[str], np.ndarray]:
    """Stack equal-length columns into a (configs, rounds) matrix, dropping incomplete rounds."""
    if not columns:
        raise ValueError("no configurations given")
    names = list(columns)
    arrays = [np.asarray(columns[k], dtype=float).ravel() for k in names]
    lengths = {a.size for a in arrays}
    if len(lengths) != 1:
        sizes = {k: a.size for k, a in zip(names, arrays, strict=True)}
        raise ValueError(f"paired arrays must have the same length (one value per round): {sizes}")
    matrix = np.vstack(arrays)
    return names, matrix[:, ~np.isnan(matrix).any(axis=0)]


def _check_positive(matrix: np.ndarray, names: list[str]) -> None:
    """Log ratios need strictly positive costs; say which configuration broke the rule."""
    bad = [n for n, row in zip(names, matrix, strict=True) if np.any(row <= 0)]
    if bad:
        raise ValueError(f"values must be > 0 to form ratios; non-positive values in {bad}")


def _bootstrap(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    confidence: float,
    n_resamples: int,
    seed: int,
    method: str,
) -> tuple[float, float, str]:
    """scipy's paired bootstrap; falls back to percentile when BCa degenerates (NaN bounds).

    BCa's jackknife costs O(n²) time and memory; beyond BCA_MAX_N units (e.g. thousands of
    scored examples) the bootstrap distribution is near-normal and percentile is used.
    """
    n = data[0].shape[-1]
    if n < 2:
        raise ValueError(f"need at least 2 paired rounds, got {n}")
    if n > BCA_MAX_N:
        method = "percentile"
    for current in dict.fromkeys((method, "percentile")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.bootstrap(
                data,
                statistic,
                n_resamples=n_resamples,
                confidence_level=confidence,
                method=current,
                paired=True,
                vectorized=True,
                **{_RNG_KW: np.random.default_rng(seed)},
            )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            break
    return lo, hi, current


def _mean_last(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def paired_delta(
    base: ArrayLike,
    opt: ArrayLike,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: str = "BCa",
) -> DeltaEstimate:
    """Saving Δ = 1 − exp(mean_r log(opt_r/base_r)) with a bootstrap CI over rounds.

    A geometric-mean ratio of per-round pairs: drift shared within a round cancels.
    The CI is bootstrapped on the mean log ratio and mapped through the monotone
    transform, which BCa and percentile intervals both respect.
    """
    names, matrix = _paired_matrix({"base": base, "opt": opt})
    _check_positive(matrix, names)
    d = np.log(matrix[1] / matrix[0])
    lo_d, hi_d, used = _bootstrap((d,), _mean_last, confidence, n_resamples, seed, method)
    return DeltaEstimate(
        point=float(saving_from_log_ratio(d.mean())),
        lo=float(saving_from_log_ratio(hi_d)),
        hi=float(saving_from_log_ratio(lo_d)),
        n_pairs=int(d.size),
        confidence=confidence,
        method=used,
    )


def saving_from_log_ratio(mean_log_ratio: ArrayLike) -> np.ndarray:
    """Δ = 1 − exp(mean log(opt/base)): the saving a geometric-mean ratio means (eq 4.1).

    Vectorised, for bootstrap resamples too; `+ 0.0` turns −0.0 into 0.0 for readable output.
    """
    return -np.expm1(mean_log_ratio) + 0.0


def joint_bootstrap(
    block_values: Mapping[str, ArrayLike],
    statistic: Callable[[Mapping[str, np.ndarray]], Any],
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: str = "BCa",
) -> DeltaEstimate:
    """Bootstrap a statistic of several configurations, resampling the same rounds for all.

    `statistic` gets {config: array} with rounds on the LAST axis and must reduce that
    axis (e.g. `np.mean(x, axis=-1)`), so one call evaluates every resample at once.
    Rounds missing (NaN) in any of the given configurations are dropped first.
    """
    names, matrix = _paired_matrix(block_values)

    def wrapped(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(statistic(dict(zip(names, arrays, strict=True))))

    point = float(wrapped(*matrix))
    lo, hi, used = _bootstrap(tuple(matrix), wrapped, confidence, n_resamples, seed, method)
    return DeltaEstimate(point, lo, hi, int(matrix.shape[1]), confidence, used)


def detects(estimate: DeltaEstimate) -> bool:
    """True when the CI excludes 0, i.e. the change is resolved (a NaN CI resolves nothing)."""
    return bool(estimate.lo > 0 or estimate.hi < 0)


def mde_for_rounds(sd: float, n_rounds: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest fractional change detectable with `n_rounds` paired rounds of log-ratio sd `sd`.

    Normal approximation: the log-scale effect m = (z_{1−α/2} + z_power)·sd/√n, reported as
    expm1(m), the larger of the two directions (a slowdown of expm1(m) or a saving of
    −expm1(−m)), so the claim holds either way.
    """
    if n_rounds < 1:
        raise ValueError(f"n_rounds must be >= 1, got {n_rounds}")
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd}")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(np.expm1(z * sd / math.sqrt(n_rounds)))


def mde_from_log_ratios(log_ratios: ArrayLike, alpha: float = 0.05, power: float = 0.8) -> float:
    """MDE of the run that produced these per-round log ratios (e.g. from an A/A comparison)."""
    d = np.asarray(log_ratios, dtype=float).ravel()
    d = d[~np.isnan(d)]
    if d.size < 2:
        raise ValueError(f"need at least 2 log ratios to estimate their spread, got {d.size}")
    return mde_for_rounds(float(np.std(d, ddof=1)), int(d.size), alpha, power)


def paired_accuracy_drop(
    base_correct: ArrayLike,
    opt_correct: ArrayLike,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: str = "BCa",
) -> DeltaEstimate:
    """Accuracy drop (base − opt, as a fraction) with a CI bootstrapped over paired examples."""
    return joint_bootstrap(
        {"base": _as_correct(base_correct), "opt": _as_correct(opt_correct)},
        lambda c: np.mean(c["base"] - c["opt"], axis=-1),
        confidence,
        n_resamples,
        seed,
        method,
    )


def _as_correct(values: ArrayLike) -> np.ndarray:
    """Per-example correctness as floats (1/0), keeping NaN for examples not scored."""
    return np.asarray(values, dtype=float).ravel()
