"""What a calibration run resolves: the noise components, the MDE, and the planted slowdowns.

The calibration measures the baseline against an identical copy of itself (A/A) and against
copies slowed by known amounts, each in several worker processes. From it: the variance
components (`bench.judge.components`), the minimum detectable effect (95% confidence, 80%
power) for one transform and for an interaction contrast of three, each planted slowdown
with an interval that must cover its true size, simulated error rates of the judge at this
noise (`bench.judge.simulate`), and what processes × rounds a 1% or 2% MDE would take
(`bench.judge.planning`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bench.judge.analysis import paired_saving, rounds_of, timed
from bench.judge.busy import busy_summary
from bench.judge.components import block_noise, variance_components
from bench.judge.planning import contrast_weight, plan_for, resolution
from bench.judge.replicated import locations
from bench.judge.simulate import error_rates
from core.errors import CompoundError
from core.samples import process_of

METRIC = "latency_mean_s"
REFERENCE, COPY = "A", "A-copy"
TARGETS = (0.01, 0.02)
INTERACTION_SINGLES = 3  # the default suite stacks three transforms
SIMULATIONS = 1000


def planted_name(fraction: float) -> str:
    return f"slowed+{fraction:.0%}"


def costs(samples: pd.DataFrame) -> dict[str, float]:
    """Wall seconds per configuration of one process's start-up and of one round (a block
    and what passes between blocks), medians over the run's processes."""
    cold = samples[(samples["block"] < 0) & (samples["metric"] == "worker_start_s")]
    starts = [
        value / max(int(extra.get("sharing", 1)), 1) if isinstance(extra, dict) else value
        for value, extra in zip(cold["value"].astype(float), cold["extra"], strict=True)
    ]
    blocks = timed(samples)
    blocks = blocks[blocks["metric"] == "block_seconds"]
    spans = []
    for _, rows in blocks.groupby([process_of(e) for e in blocks["extra"]]):
        n = len(rows)
        if n > 1:
            spans.append((rows["t_end"].max() - rows["t_start"].min()) * n / (n - 1) / n)
    return {
        "process_start_s": float(np.median(starts)) if starts else float("nan"),
        "block_s": float(np.median(spans)) if spans else float("nan"),
    }


def calibration_report(
    samples: pd.DataFrame,
    planted: tuple[float, ...],
    budget: float,
    device: str,
    simulations: int = SIMULATIONS,
) -> dict[str, Any]:
    """Components, MDEs, simulated error rates and plans from the run; each planted slowdown
    as measured."""
    rounds = rounds_of(samples, METRIC)
    located = locations(rounds)
    aa = paired_saving(located, REFERENCE, COPY) if not rounds.table.empty else None
    if aa is None:
        raise CompoundError("calibration produced no paired A/A rounds (all blocks failed?)")
    try:
        components = variance_components(rounds)
    except ValueError as error:
        raise CompoundError(f"calibration: {error}; give it a larger --budget") from None
    processes, per_process = components.processes, components.rounds_per_process
    planted_rows = []
    for fraction in planted:
        estimate = paired_saving(located, REFERENCE, planted_name(fraction))
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
    weight = contrast_weight(INTERACTION_SINGLES)
    single = resolution(components.measured_se(2), processes)
    interaction = resolution(components.measured_se(weight), processes)
    cost = costs(samples)
    configurations = components.configurations
    process_s = cost["process_start_s"] * configurations
    round_s = cost["block_s"] * configurations
    simulated = None
    if simulations and processes >= 4:
        simulated = error_rates(
            components,
            block_noise(rounds),
            processes,
            max(2, round(per_process)),
            runs=simulations,
        ).to_dict()
    return {
        "device": device,
        "budget_s": budget,
        "metric": METRIC,
        "processes": processes,
        "rounds": aa.rounds,
        "rounds_per_process": per_process,
        "placement": _placement(samples),
        "tau": components.tau,
        "sigma": components.sigma,
        "components": components.to_dict(),
        "aa_delta": aa.point,
        "aa_ci": [aa.lo, aa.hi],
        "interval_method": aa.method,
        "estimator": (
            f"per process, the {components.trim:.0%}-trimmed mean of round-centred log block "
            "times; contrasts between configurations over processes (jackknife, t(P−1))"
        ),
        "mde_pct": 100.0 * single,
        "mde_interaction_pct": 100.0 * interaction,
        "mde_definition": (
            "smallest change detected with 95% confidence and 80% power, including the "
            f"variance between processes: from the spread of {processes} processes' "
            f"locations ({per_process:.1f} rounds each); the interaction contrast is "
            f"stack − Σ {INTERACTION_SINGLES} singles (its variance is {weight}/2 of a "
            "single's)"
        ),
        "worker_start_s": cost["process_start_s"],
        "block_s": cost["block_s"],
        "plans": [
            plan_for(target, components, w, process_s, round_s).to_dict() | {"contrast": name}
            for name, w in (("single", 2), ("interaction", weight))
            for target in TARGETS
        ],
        "plans_for": f"this calibration's {configurations} configurations, seconds in all",
        "simulation": simulated,
        "planted": planted_rows,
        "busy": busy_summary(samples),
    }


def _placement(samples: pd.DataFrame) -> str:
    cold = samples[(samples["block"] < 0) & (samples["metric"] == "worker_start_s")]
    shared = any(isinstance(e, dict) and e.get("sharing", 1) > 1 for e in cold["extra"])
    return "coresident" if shared else "isolated"
