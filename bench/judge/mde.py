"""What a calibration run resolves: process and round noise, the MDE, and the planted slowdowns.

The calibration measures the baseline against an identical copy of itself (A/A) and against
copies slowed by known amounts, each in several worker processes. From it: τ (the SD of a
process's offset) and σ (round-to-round SD within a process), the minimum detectable effect
(95% confidence, 80% power) for one transform and for an interaction contrast, each planted
slowdown with an interval that must cover its true size, and what P processes × K rounds a
1% or 2% MDE would take on this machine (Kalibera and Jones, ISMM 2013).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bench.judge.analysis import paired_saving, rounds_of, timed
from bench.judge.busy import busy_summary
from bench.judge.replicated import contrast_weight, mde, plan_for, variance_components
from core.errors import CompoundError

METRIC = "latency_mean_s"
REFERENCE, COPY = "A", "A-copy"
TARGETS = (0.01, 0.02)
INTERACTION_SINGLES = 3  # the default suite stacks three transforms


def planted_name(fraction: float) -> str:
    return f"slowed+{fraction:.0%}"


def _median(samples: pd.DataFrame, metric: str, cold: bool = False) -> float:
    rows = samples[samples["block"] < 0] if cold else timed(samples)
    values = rows.loc[rows["metric"] == metric, "value"].astype(float)
    return float(np.median(values)) if len(values) else float("nan")


def calibration_report(
    samples: pd.DataFrame, planted: tuple[float, ...], budget: float, device: str
) -> dict[str, Any]:
    """τ, σ, MDEs and a plan from the run; each planted slowdown as measured."""
    rounds = rounds_of(samples, METRIC)
    aa = paired_saving(rounds, REFERENCE, COPY) if not rounds.table.empty else None
    if aa is None:
        raise CompoundError("calibration produced no paired A/A rounds (all blocks failed?)")
    components = variance_components(rounds.select(list(rounds.table.columns)))
    processes, per_process = components.processes, components.rounds_per_process
    start_s = _median(samples, "worker_start_s", cold=True)
    round_s = _median(samples, "block_seconds")
    planted_rows = []
    for fraction in planted:
        estimate = paired_saving(rounds, REFERENCE, planted_name(fraction))
        if estimate is None:
            continue
        # Δ = 1 − opt/base, so the measured slowdown is −Δ; the truth is the planted ratio.
        lo, hi = -estimate.hi, -estimate.lo
        planted_rows.append(
            {
                "planted_slowdown": fraction,
                "measured_slowdown": -estimate.point,
                "ci": [lo, hi],
                "covers": bool(lo <= fraction <= hi),
                "detected": bool(lo > 0),
            }
        )
    single = mde(components.tau, components.sigma, processes, per_process)
    weight = contrast_weight(INTERACTION_SINGLES)
    interaction = mde(components.tau, components.sigma, processes, per_process, weight)
    return {
        "device": device,
        "budget_s": budget,
        "metric": METRIC,
        "processes": processes,
        "rounds": aa.rounds,
        "rounds_per_process": per_process,
        "tau": components.tau,
        "sigma": components.sigma,
        "aa_delta": aa.point,
        "aa_ci": [aa.lo, aa.hi],
        "interval_method": aa.method,
        "mde_pct": 100.0 * single,
        "mde_interaction_pct": 100.0 * interaction,
        "mde_definition": (
            "smallest change detected with 95% confidence and 80% power, including the "
            f"variance between processes: τ and σ estimated from {processes} processes × "
            f"{per_process:.1f} rounds; the interaction contrast is stack − Σ "
            f"{INTERACTION_SINGLES} singles (its variance is {weight}/2 of a single's)"
        ),
        "worker_start_s": start_s,
        "block_s": round_s,
        "plans": [
            plan_for(target, components, start_s, round_s) | {"contrast": "single"}
            for target in TARGETS
        ]
        + [
            plan_for(target, components, start_s, round_s, weight) | {"contrast": "interaction"}
            for target in TARGETS
        ],
        "planted": planted_rows,
        "busy": busy_summary(samples),
    }
