"""Estimates over replicated worker processes: the process is a level of the experiment.

A run measures every configuration in P processes (one per *epoch*: all workers are restarted
together between epochs) and several rounds in each. A configuration's log time is

    log y[c, e, r] = μ[c] + ρ[e, r] + τ[c, e] + ε[c, e, r]

with ρ the drift shared by a round (cancelled by pairing configurations within it), τ the
process offset (Mytkowicz et al. 2009; about 1–2% on a shared 2-core VM) and ε the
round-to-round noise. Rounds inside one process are pseudo-replicates of its τ, so an interval
over rounds alone is too narrow. Here every statistic gets its interval from a delete-one-epoch
jackknife with t(P−1) quantiles: the epoch is the independent unit, so both levels enter, and
with a balanced design and a linear statistic this is exactly the mixed model's interval.
With one epoch the process level cannot be estimated: the interval falls back to resampling
rounds and says so (`includes_process_variance` is False).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
ROUND_RESAMPLES = 1000
ROUNDS_ONLY = "bootstrap over rounds (one process per configuration: excludes process variance)"

Statistic = Callable[[Mapping[str, np.ndarray]], float]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval, standard error and the levels it covers."""

    point: float
    lo: float
    hi: float
    se: float
    df: int
    processes: int
    rounds: int
    method: str
    includes_process_variance: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def p_value(self) -> float:
        """Two-sided p-value of `point == 0` from the same t reference (NaN without an SE)."""
        if not (self.se > 0 and math.isfinite(self.se)):
            return math.nan
        return float(2 * stats.t.sf(abs(self.point) / self.se, max(self.df, 1)))

    def mapped(self, transform: Callable[[float], float], *, increasing: bool = False) -> Estimate:
        """The estimate through a monotone `transform` (log ratio → saving is decreasing)."""
        ends = (transform(self.lo), transform(self.hi))
        return Estimate(
            point=transform(self.point),
            lo=ends[0] if increasing else ends[1],
            hi=ends[1] if increasing else ends[0],
            se=math.nan,
            df=self.df,
            processes=self.processes,
            rounds=self.rounds,
            method=self.method,
            includes_process_variance=self.includes_process_variance,
        )


@dataclass(frozen=True)
class Rounds:
    """Values of configurations (columns), one row per round labelled with the epoch (process)
    it was measured in; or, from `locations`, one row per process (`round_count` then says how
    many rounds stand behind the rows)."""

    table: pd.DataFrame
    epochs: pd.Series
    round_count: int | None = None

    def select(self, names: list[str]) -> Rounds:
        """Only `names`, and only the rows where all of them were measured."""
        missing = [n for n in names if n not in self.table]
        if missing:
            raise ValueError(f"no values for configuration(s) {missing}")
        table = self.table[names].dropna()
        return Rounds(table, self.epochs.reindex(table.index), self.round_count)

    @property
    def n_epochs(self) -> int:
        return int(self.epochs.nunique())

    def arrays(self, index: np.ndarray | None = None) -> dict[str, np.ndarray]:
        table = self.table if index is None else self.table.loc[index]
        return {name: table[name].to_numpy(dtype=float) for name in table.columns}


def estimate(rounds: Rounds, statistic: Statistic, confidence: float = CONFIDENCE) -> Estimate:
    """`statistic` of the configurations' per-round values, with a delete-one-epoch jackknife
    interval (t with P−1 degrees of freedom), or a round bootstrap when P is 1.

    `statistic` takes {config: 1-D array over rounds} and returns a float.
    """
    if len(rounds.table) < 2:
        raise ValueError(f"need at least 2 complete rounds, got {len(rounds.table)}")
    point = float(statistic(rounds.arrays()))
    epochs = rounds.epochs.to_numpy()
    labels = np.unique(epochs)
    n_rounds = rounds.round_count or len(rounds.table)
    if labels.size < 2:
        return _rounds_only(rounds, statistic, point, confidence)
    columns = {name: rounds.table[name].to_numpy(dtype=float) for name in rounds.table.columns}
    leave_out = np.array(
        [statistic({k: v[epochs != label] for k, v in columns.items()}) for label in labels]
    )
    p = labels.size
    se = float(math.sqrt((p - 1) / p * np.sum((leave_out - leave_out.mean()) ** 2)))
    half = float(stats.t.ppf(0.5 + confidence / 2, p - 1)) * se
    return Estimate(
        point,
        point - half,
        point + half,
        se,
        p - 1,
        p,
        n_rounds,
        f"jackknife over {p} processes, t({p - 1})",
        True,
    )


def _rounds_only(rounds: Rounds, statistic: Statistic, point: float, confidence: float) -> Estimate:
    """Percentile bootstrap over rounds: all one process can give, and too narrow."""
    arrays = rounds.arrays()
    n = len(rounds.table)
    rng = np.random.default_rng(0)
    draws = np.array(
        [
            statistic({k: v[index] for k, v in arrays.items()})
            for index in rng.integers(0, n, size=(ROUND_RESAMPLES, n))
        ]
    )
    tail = (1 - confidence) / 2
    lo, hi = np.nanquantile(draws, [tail, 1 - tail])
    return Estimate(point, float(lo), float(hi), math.nan, 1, 1, n, ROUNDS_ONLY, False)


# Share of rounds trimmed from each end of a process's values (`locations`): chosen on the
# stored reference runs and by simulation (README, "Measurement notes").
TRIM = 0.2


def locations(rounds: Rounds, trim: float = TRIM) -> Rounds:
    """One value per process and configuration, the estimator every contrast is made of.

    Each round is centred on its mean log value over the configurations (what the round
    shares cancels in every contrast); then, per process, the `trim`-trimmed mean over its
    rounds of each configuration's centred log value (a few stalled blocks cannot move it).
    The centring is linear on purpose: every configuration's centred noise then has the same
    distribution whatever the effects, so contrasts stay unbiased under skewed noise, which a
    median centring is not (+0.4% on a 5% effect at this machine's tails; README). Only the
    rounds where every configuration of the process was measured count. The rows are
    processes, the unit that carries an offset, so intervals over them include it. Values
    are exp(location): contrasts are ratios of them, as of raw times. Non-positive values are
    missing. With one process there is nothing to locate over: the rounds are returned.
    """
    table = rounds.table
    epochs = rounds.epochs.reindex(table.index)
    if table.empty or epochs.nunique() < 2:
        return rounds
    logs = np.log(table.where(table > 0))
    present = logs.notna().sum(axis=1)
    complete = present == present.groupby(epochs.to_numpy()).transform("max")
    logs = logs[complete & (present >= 2)]
    centred = logs.sub(logs.mean(axis=1), axis=0)
    labels = epochs.reindex(centred.index).to_numpy()
    values = centred.to_numpy(dtype=float)
    processes = np.unique(labels)
    located = pd.DataFrame(
        [[trimmed_mean(column, trim) for column in values[labels == e].T] for e in processes],
        index=processes,
        columns=centred.columns,
    )
    return Rounds(np.exp(located), pd.Series(processes, index=processes), len(centred))


def trimmed_mean(values: np.ndarray, trim: float = TRIM) -> float:
    """Mean of the finite values after cutting `trim` of them from each end (NaN if none)."""
    finite = np.sort(values[np.isfinite(values)])
    cut = int(trim * finite.size)  # as scipy.stats.trim_mean cuts
    return float(finite[cut : finite.size - cut].mean()) if finite.size else math.nan


def mean_log_ratio(base: str, opt: str) -> Statistic:
    """mean over rounds of log(opt/base): the log of the geometric-mean ratio."""
    return lambda c: float(np.mean(np.log(c[opt] / c[base])))


def saving_from_log(value: float) -> float:
    """Δ = 1 − exp(mean log ratio); positive means saved."""
    return float(-math.expm1(value)) + 0.0


def saving(rounds: Rounds, base: str, opt: str, confidence: float = CONFIDENCE) -> Estimate:
    """Δ of `opt` against `base`, its interval mapped from the log ratio's (monotone)."""
    pair = rounds.select([base, opt])
    _check_positive(pair)
    return estimate(pair, mean_log_ratio(base, opt), confidence).mapped(saving_from_log)


def _check_positive(rounds: Rounds) -> None:
    bad = [n for n in rounds.table if (rounds.table[n] <= 0).any()]
    if bad:
        raise ValueError(f"values must be > 0 to form ratios; non-positive values in {bad}")
