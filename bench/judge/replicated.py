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
    """Per-round values of configurations (rows: rounds, columns: configurations), each round
    labelled with the epoch (process) it was measured in."""

    table: pd.DataFrame
    epochs: pd.Series

    def select(self, names: list[str]) -> Rounds:
        """Only `names`, and only the rounds where all of them were measured."""
        missing = [n for n in names if n not in self.table]
        if missing:
            raise ValueError(f"no values for configuration(s) {missing}")
        table = self.table[names].dropna()
        return Rounds(table, self.epochs.reindex(table.index))

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
    n_rounds = len(rounds.table)
    if labels.size < 2:
        return _rounds_only(rounds, statistic, point, confidence)
    leave_out = np.array(
        [statistic(rounds.arrays(rounds.table.index[epochs != label])) for label in labels]
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


# --- variance components and the minimum detectable effect ----------------------------------


@dataclass(frozen=True)
class Components:
    """Process-level SD τ and within-process (round) SD σ of log values, per configuration."""

    tau: float
    sigma: float
    processes: int
    rounds_per_process: float
    configurations: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def variance_components(rounds: Rounds) -> Components:
    """τ and σ from the run itself: one-way random-effects ANOVA per configuration over its
    epochs, after removing each round's shared drift; pooled over configurations.

    Centering each round on its mean over C configurations shrinks both components by
    (1 − 1/C); they are scaled back. τ² is clamped at 0 (its estimate can go negative).
    """
    table = rounds.table.dropna()
    names = list(table.columns)
    c = len(names)
    if c < 2 or len(table) < 2:
        raise ValueError("variance components need at least 2 configurations and 2 rounds")
    logs = np.log(table.to_numpy(dtype=float))
    centred = logs - logs.mean(axis=1, keepdims=True)
    epochs = rounds.epochs.reindex(table.index).to_numpy()
    labels = np.unique(epochs)
    scale = c / (c - 1)
    within, between = [], []
    for j in range(c):
        groups = [centred[epochs == label, j] for label in labels]
        sizes = np.array([g.size for g in groups], dtype=float)
        ss_within = sum(float(np.sum((g - g.mean()) ** 2)) for g in groups)
        df_within = float(np.sum(sizes - 1))
        ms_within = ss_within / df_within if df_within > 0 else math.nan
        within.append(ms_within)
        if labels.size >= 2:
            grand = np.concatenate(groups).mean()
            ms_between = float(
                np.sum(sizes * (np.array([g.mean() for g in groups]) - grand) ** 2)
            ) / (labels.size - 1)
            n0 = (sizes.sum() - np.sum(sizes**2) / sizes.sum()) / (labels.size - 1)
            between.append((ms_between - ms_within) / n0)
    # One round per process leaves no within-process variance to estimate: σ is unknown.
    known = [w for w in within if math.isfinite(w)]
    sigma2 = float(np.mean(known)) * scale if known else math.nan
    tau2 = max(0.0, float(np.mean(between)) * scale) if between else math.nan
    return Components(
        tau=math.sqrt(tau2) if math.isfinite(tau2) else math.nan,
        sigma=math.sqrt(sigma2),
        processes=int(labels.size),
        rounds_per_process=len(table) / labels.size,
        configurations=c,
    )


def contrast_weight(singles: int) -> int:
    """Σ of squared coefficients of the log-scale interaction contrast
    stack − Σ singles + (k − 1)·baseline: 1 + k + (k − 1)²; a plain A vs B comparison is 2."""
    return 1 + singles + (singles - 1) ** 2


def mde(
    tau: float,
    sigma: float,
    processes: int,
    rounds_per_process: float,
    weight: float = 2.0,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """Smallest change detected with 95% confidence and 80% power by a contrast of log means
    whose squared coefficients sum to `weight`, with P processes of K rounds each:
    SE = √(weight·(τ² + σ²/K)/P), t quantiles with P−1 degrees of freedom."""
    if processes < 2:
        return math.nan
    se = math.sqrt(weight * (tau**2 + sigma**2 / rounds_per_process) / processes)
    df = processes - 1
    m = (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se
    return float(math.expm1(m))


def plan_for(
    target: float,
    components: Components,
    start_seconds: float,
    round_seconds: float,
    weight: float = 2.0,
    max_processes: int = 1000,
) -> dict[str, Any]:
    """Processes and rounds per process that reach MDE `target` in the least time.

    Kalibera and Jones (ISMM 2013): with a cost `start_seconds` per process and
    `round_seconds` per round, the optimal rounds per process is √(start·σ² / (round·τ²));
    then the fewest processes that reach the target. Times are per configuration.
    """
    tau, sigma = components.tau, components.sigma
    if tau > 0:
        k = max(1, round(math.sqrt(start_seconds * sigma**2 / (round_seconds * tau**2))))
    else:
        k = max(1, round(components.rounds_per_process))
    for p in range(2, max_processes + 1):
        if mde(tau, sigma, p, k, weight) <= target:
            seconds = p * (start_seconds + k * round_seconds)
            return {"target": target, "processes": p, "rounds_per_process": k, "seconds": seconds}
    return {"target": target, "processes": None, "rounds_per_process": k, "seconds": None}
