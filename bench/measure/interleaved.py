"""Two or more kernels timed in interleaved rounds, and the median of per-round ratios with a
bootstrap interval: the protocol `compound attention`, `compound sparse-gemm` and
`compound coldstart` share.

Each round runs every kernel once, in a shuffled order, so drift on a shared machine falls on
all of them; the interval resamples rounds (or repeats), so it says nothing of the spread
between processes unless each repeat is its own process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats

TimeCalls = Callable[[Callable[[], Any], int], float]  # (kernel, calls) → time per call


def interleaved_rounds(
    kernels: dict[str, Callable[[], Any]], time_calls: TimeCalls, calls: int, rounds: int, seed: int
) -> dict[str, np.ndarray]:
    """Per kernel, its time per call in each round, after one warm-up round."""
    for kernel in kernels.values():
        time_calls(kernel, calls)
    order = np.random.default_rng(seed)
    per_round: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(rounds):
        for name in order.permutation(list(kernels)):
            per_round[name].append(time_calls(kernels[name], calls))
    return {name: np.asarray(values) for name, values in per_round.items()}


def median_ratio(ratios: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Median of `ratios` and its 95% percentile-bootstrap interval (NaN under 3 values)."""
    array = np.asarray(ratios, dtype=float)
    median = float(np.median(array))
    if len(array) < 3:
        return median, float("nan"), float("nan")
    interval = stats.bootstrap(
        (array,), np.median, confidence_level=0.95, n_resamples=2000, method="percentile"
    ).confidence_interval
    return median, float(interval.low), float(interval.high)
