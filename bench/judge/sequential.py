"""Stopping when decided: repeated confidence intervals with Lan–DeMets alpha spending.

A run may look at its verdict after every process (epoch) from the first look on, and stop
as soon as the residual's interval is decisive against the margin (`verdict.departure`).
Looking many times at a fixed 95% interval would be wrong more often than 5%; here look k
uses a critical value c_k chosen so that the two-sided error spent up to the information
fraction t = processes / planned processes is the O'Brien–Fleming-type α(t) =
2 − 2Φ(z₁₋α/₂ / √t) (Lan and DeMets 1983). The intervals built with these c_k cover the
truth at every look at once with probability 1 − α (Jennison and Turnbull's repeated
confidence intervals), so a decision taken at whichever look stops the run is wrong with
probability at most α. Early looks are wide: only a clear answer stops a run early, and the
last look costs little.

Our intervals are t intervals over processes, with a standard error estimated anew at each
look, so the c_k are computed for that studentized statistic, not for a z statistic (a z
boundary read at the same tail probability of t erred 5.3–6.3% where 5% was promised, in
1,000 simulated runs): they are quantiles of |mean/SE| over simulated sequences of normal
per-process values, among the sequences not yet stopped (a fixed seed, so every run
computes the same boundaries). That this keeps the error rate at this machine's noise is
checked in every calibration (`bench.judge.simulate`).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from scipy import stats

ALPHA = 0.05
PATHS = 200_000  # simulated sequences behind the boundaries
SEED = 20261207
FEWEST_EXITS = 20  # a look that may spend fewer simulated exits than this does not stop


def spent(fraction: float, alpha: float = ALPHA) -> float:
    """Lan–DeMets O'Brien–Fleming-type spending: the error allowed up to `fraction`."""
    if fraction <= 0:
        return 0.0
    return float(2 - 2 * stats.norm.cdf(stats.norm.ppf(1 - alpha / 2) / math.sqrt(fraction)))


LOOKS_AT = (0.5, 0.75, 1.0)  # fractions of the planned processes after which a run looks


def look_points(planned: int) -> tuple[int, ...]:
    """The numbers of processes after which a run of `planned` processes looks: half, three
    quarters and all of them (each at least 2, the fewest an interval can be made of). Three
    looks cost the last interval 5–8% of width against a run that never looks (1.05–1.08×
    the fixed t quantile); a look after every process cost 13–15%."""
    return tuple(sorted({max(2, math.ceil(planned * f)) for f in LOOKS_AT}))


@cache
def boundaries(
    looks: tuple[int, ...], planned: int, ends: bool = True, alpha: float = ALPHA
) -> tuple[float, ...]:
    """Critical values of |estimate / SE| (t scale) at looks after the given numbers of
    processes, error spent by the information fraction looks / `planned`; when the last
    look `ends` the run, it spends all that is left (a run cut short by its budget ends
    early). inf where a look may not stop the run."""
    if not looks or looks[0] < 2 or any(b <= a for a, b in zip(looks, looks[1:], strict=False)):
        raise ValueError(f"looks must be increasing numbers of processes >= 2, got {looks}")
    rng = np.random.default_rng(SEED)
    total = np.zeros(PATHS)
    squares = np.zeros(PATHS)
    going = np.ones(PATHS, dtype=bool)
    critical = []
    used = 0.0
    for k in range(1, looks[-1] + 1):
        x = rng.standard_normal(PATHS)
        total += x
        squares += x * x
        if k not in looks:
            continue
        mean = total / k
        sd = np.sqrt(np.maximum(squares - k * mean**2, 0.0) / (k - 1))
        statistic = np.abs(mean) / (sd / math.sqrt(k))
        last = ends and k == looks[-1]
        allowed = (alpha if last else spent(min(k / planned, 1.0), alpha)) - used
        exits = int(allowed * PATHS)
        if exits < FEWEST_EXITS:
            critical.append(math.inf)
            continue
        candidates = np.sort(statistic[going])[::-1]
        c = float(candidates[min(exits, candidates.size) - 1])
        stopped = going & (statistic >= c)
        used += stopped.sum() / PATHS
        going &= ~stopped
        critical.append(c)
    return tuple(critical)


def look_confidence(processes: int, planned: int, *, final: bool, alpha: float = ALPHA) -> float:
    """The nominal two-sided confidence of the t interval (`processes` − 1 degrees of freedom)
    after `processes` of `planned`: at a look that may stop the run (`final` False: one of
    `look_points`), or at the run's end, which spends the error the looks before it left."""
    earlier = tuple(k for k in look_points(planned) if k < processes)
    if not final and processes not in look_points(planned):
        raise ValueError(f"no look is planned after {processes} of {planned} processes")
    if processes < 2:
        raise ValueError("an interval needs at least 2 processes")
    c = boundaries((*earlier, processes), planned, final, alpha)[-1]
    return 1.0 if math.isinf(c) else float(1 - 2 * stats.t.sf(c, processes - 1))
