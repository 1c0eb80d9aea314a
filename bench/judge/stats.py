"""Robust summaries of one configuration's block values (torch.utils.benchmark style).

Comparisons between configurations, with intervals over worker processes, are in
`bench.judge.replicated`.
"""

from __future__ import annotations

import inspect
import math
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
