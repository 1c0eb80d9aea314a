"""Variance components of a run's block times, and what they mean for its resolution.

A block's log time is modelled as

    log y[c, e, r] = μ[c] + ρ[e, r] + τ[c, e] + ε[c, e, r]

ρ the round effect shared by every configuration in round r of process e (pairing within the
round cancels it), τ the offset of configuration c in process e (only more processes average
it away), ε the block noise, heavy-tailed on shared machines. Every contrast the judge makes
is a difference of per-process locations (`replicated.locations`), so its variance over
processes is w·(τ² + σ_eff²/K)/P, with w the sum of the contrast's squared coefficients, K
the rounds per process and σ_eff the block SD the trimmed mean behaves as if it had.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from bench.judge.replicated import TRIM, Rounds, locations

TAIL_SHARE = 0.05  # the slowest blocks whose share of the variance measures the tail


@dataclass(frozen=True)
class Components:
    """The noise of one metric in one run, each part with how it was estimated (`methods`)."""

    round_sd: float  # ρ: shared by the configurations of a round
    tau: float  # τ: one configuration's offset in one process
    sigma: float  # ε: block noise, classical SD
    sigma_robust: float  # ε from the median absolute deviation
    sigma_effective: float  # ε as seen by the trimmed mean
    location_sd: float  # SD over processes of one configuration's location: √(τ² + σ_eff²/K)
    tail_share: float  # share of the block-noise variance in the slowest 5% of blocks
    excess_kurtosis: float
    beyond_3_robust_sd: float  # share of blocks further than 3 robust SDs
    processes: int
    rounds_per_process: float
    configurations: int
    trim: float
    methods: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The components in one line, for the terminal."""
        return (
            f"noise: round effect ρ {self.round_sd:.1%} (cancelled by pairing), process offset "
            f"τ {self.tau:.2%}, block noise σ {self.sigma:.1%} (robust {self.sigma_robust:.1%}, "
            f"{self.sigma_effective:.1%} as the {self.trim:.0%}-trimmed mean sees it); tail: "
            f"the slowest {TAIL_SHARE:.0%} of blocks carry {self.tail_share:.0%} of its "
            f"variance; {self.processes} processes × {self.rounds_per_process:.1f} rounds"
        )

    def contrast_se(self, weight: float, processes: int, rounds_per_process: float) -> float:
        """SE (log scale) of a contrast of locations whose squared coefficients sum to
        `weight`, at another number of processes and rounds (what a plan expects)."""
        variance = self.tau**2 + self.sigma_effective**2 / rounds_per_process
        return math.sqrt(weight * variance / processes)

    def measured_se(self, weight: float) -> float:
        """The same contrast's SE in this run, from its locations' measured spread."""
        return math.sqrt(weight * self.location_sd**2 / self.processes)


def _winsorized_sd(values: np.ndarray, trim: float) -> float:
    """SD of the sample with `trim` of it clamped at each end, over (1 − 2·trim): the
    asymptotic SD of the trimmed mean times √n (Tukey and McLaughlin 1963)."""
    ordered = np.sort(values)
    cut = int(math.floor(trim * ordered.size))
    if cut:
        ordered[:cut] = ordered[cut]
        ordered[-cut:] = ordered[-cut - 1]
    return float(np.std(ordered, ddof=1) / (1 - 2 * trim))


@dataclass(frozen=True)
class _Centred:
    """Round-centred log values and what is left of them once each configuration's offset in
    each process is taken off (the block noise)."""

    logs: pd.DataFrame
    centred: pd.DataFrame
    epochs: np.ndarray
    noise: np.ndarray
    per_process: pd.Series


def _centred(rounds: Rounds) -> _Centred:
    table = rounds.table
    epochs = rounds.epochs.reindex(table.index)
    if table.shape[1] < 2 or epochs.nunique() < 2 or len(table) < 4:
        raise ValueError(
            "variance components need at least 2 configurations, 2 processes and 4 rounds"
        )
    logs = np.log(table.where(table > 0))
    logs = logs[logs.notna().sum(axis=1) >= 2]
    labels = epochs.reindex(logs.index).to_numpy()
    centred = logs.sub(logs.mean(axis=1), axis=0)
    noise = (centred - centred.groupby(labels).transform("mean")).to_numpy().ravel()
    return _Centred(logs, centred, labels, noise[np.isfinite(noise)], logs.groupby(labels).size())


def block_noise(rounds: Rounds) -> np.ndarray:
    """The run's block noise (log scale, each configuration's offset in each process taken
    off), with its real tails: what a simulation of this machine resamples."""
    return _centred(rounds).noise


def variance_components(rounds: Rounds, trim: float = TRIM) -> Components:
    """The components from a run's own per-round values (all configurations, all processes).

    Needs at least two configurations, two processes and four rounds.
    """
    parts = _centred(rounds)
    noise, epochs = parts.noise, parts.epochs
    c = parts.logs.shape[1]
    scale = c / (c - 1)  # centring on the round's own configurations shrinks each part
    k = float(parts.per_process.mean())
    # degrees of freedom: one mean per configuration and process was taken off
    dof = max(noise.size - c * parts.per_process.size, 1)
    sigma2 = float(np.sum(noise**2)) / dof * scale
    winsorized = [
        _winsorized_sd(values, trim) ** 2
        for _, rows in parts.centred.groupby(epochs)
        for name in parts.centred.columns
        if (values := rows[name].dropna().to_numpy(dtype=float)).size >= 3
    ]
    sigma_eff2 = float(np.mean(winsorized)) * scale if winsorized else math.nan
    location_logs = np.log(locations(rounds, trim).table)
    location_var = float(np.nanmean(location_logs.var(axis=0, ddof=1))) * scale
    tau2 = max(0.0, location_var - sigma_eff2 / k)
    # Round effect: the round's mean over configurations (their own means removed), less the
    # block noise that mean still carries, within each process.
    round_means = (parts.logs - parts.logs.mean()).mean(axis=1)
    within_process = round_means - round_means.groupby(epochs).transform("mean")
    round2 = max(0.0, float(np.var(within_process, ddof=1)) - sigma2 / c)
    squares = np.sort(noise**2)[::-1]
    total = float(squares.sum())
    robust = float(stats.median_abs_deviation(noise, scale="normal")) * math.sqrt(scale)
    return Components(
        round_sd=math.sqrt(round2),
        tau=math.sqrt(tau2),
        sigma=math.sqrt(sigma2),
        sigma_robust=robust,
        sigma_effective=math.sqrt(sigma_eff2),
        location_sd=math.sqrt(location_var),
        tail_share=float(squares[: max(1, int(TAIL_SHARE * squares.size))].sum()) / total
        if total > 0
        else 0.0,
        excess_kurtosis=float(stats.kurtosis(noise)),
        beyond_3_robust_sd=float(np.mean(np.abs(noise) > 3 * robust)) if robust > 0 else 0.0,
        processes=int(parts.per_process.size),
        rounds_per_process=k,
        configurations=c,
        trim=trim,
        methods=METHODS,
    )


METHODS = {
    "round_sd": "SD over the rounds of one process of the mean over configurations of their "
    "log values (each configuration's mean removed), less the block noise that mean carries",
    "tau": "variance over processes of one configuration's location (round-centred, trimmed), "
    "less σ_eff²/K; pooled over configurations, clamped at 0",
    "sigma": "SD of round-centred log values around their configuration's mean in each process",
    "sigma_robust": "the same from the median absolute deviation (× 1.4826)",
    "sigma_effective": "winsorized SD / (1 − 2·trim) in each configuration and process: what "
    "the trimmed mean's variance behaves as (Tukey and McLaughlin 1963)",
    "tail_share": "share of Σ noise² in the slowest 5% of blocks (a normal sample: about 0.25)",
    "scale": "centring on the round's configurations shrinks each part by (C−1)/C: scaled back",
}
