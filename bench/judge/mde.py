"""What a calibration run resolves: the minimum detectable effect, and the planted slowdowns.

The calibration measures the baseline against an identical copy of itself (A/A) and against
copies slowed by known amounts. The A/A spread of per-round log ratios gives the minimum
detectable effect (95% confidence, 80% power); the planted slowdowns show whether the harness
recovers effects of known size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bench.judge.analysis import block_values, paired_saving
from bench.judge.stats import detects, mde_from_log_ratios
from core.errors import CompoundError

METRIC = "latency_mean_s"
REFERENCE, COPY = "A", "A-copy"


def planted_name(fraction: float) -> str:
    return f"slowed+{fraction:.0%}"


def calibration_report(
    samples: pd.DataFrame, planted: tuple[float, ...], budget: float, device: str
) -> dict[str, Any]:
    """The MDE from the A/A rounds, and each planted slowdown as measured."""
    table = block_values(samples, METRIC)
    aa = paired_saving(table, REFERENCE, COPY) if not table.empty else None
    if aa is None:
        raise CompoundError("calibration produced no paired A/A rounds (all blocks failed?)")
    pair = table[[REFERENCE, COPY]].dropna()
    log_ratios = np.log(pair[COPY].to_numpy() / pair[REFERENCE].to_numpy())
    planted_rows = []
    for fraction in planted:
        estimate = paired_saving(table, REFERENCE, planted_name(fraction))
        if estimate is None:
            continue
        planted_rows.append(
            {
                "planted_slowdown": fraction,
                # Δ = 1 − opt/base (geometric over rounds), so the measured slowdown is −Δ.
                "measured_slowdown": -estimate.point,
                "ci": [-estimate.hi, -estimate.lo],
                "detected": detects(estimate),
            }
        )
    return {
        "device": device,
        "budget_s": budget,
        "metric": METRIC,
        "rounds": aa.n_pairs,
        "aa_delta": aa.point,
        "aa_ci": [aa.lo, aa.hi],
        "log_ratio_sd": float(np.std(log_ratios, ddof=1)),
        "mde_pct": 100.0 * mde_from_log_ratios(log_ratios),
        "mde_definition": "smallest change detected with 95% confidence and 80% power, "
        f"from the A/A per-round log-ratio spread over {aa.n_pairs} rounds",
        "planted": planted_rows,
    }
