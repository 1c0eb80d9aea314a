"""How many of a run's blocks were timed on a busy machine (`core.busy`'s rule)."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pandas as pd

from core.busy import BUSY_OTHER_CPU_FRACTION, BUSY_RUN_BLOCK_FRACTION, is_busy


def _extra_float(extra: Any, key: str) -> float:
    value = extra.get(key) if isinstance(extra, dict) else None
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def busy_summary(
    samples: pd.DataFrame,
    threshold: float = BUSY_OTHER_CPU_FRACTION,
    run_fraction: float = BUSY_RUN_BLOCK_FRACTION,
) -> dict[str, Any]:
    """How many of a run's blocks were timed on a busy machine, from its tidy sample frame.

    `samples` is `RunStore.samples_frame()` (columns config, block, metric, value, unit,
    module, source, t_start, t_end, extra). Each block is judged afresh with `is_busy` on
    its recorded `other_cpu_fraction`; the run is busy when more than `run_fraction` of
    its blocks are, and then `message` is one line for the report, else "".
    """
    rows = samples[samples["metric"] == "other_cpu_s"].drop_duplicates(["config", "block"])
    fractions = [_extra_float(extra, "other_cpu_fraction") for extra in rows["extra"]]
    known = [f for f in fractions if math.isfinite(f)]
    busy = [f for f in known if is_busy(f, threshold)]
    n_blocks = len(rows)

    loads = [float(v) for v in samples.loc[samples["metric"] == "load_avg_1m", "value"]]
    for extra in samples.loc[samples["metric"] == "load_avg_1m", "extra"]:
        loads += [_extra_float(extra, "load_1m_start"), _extra_float(extra, "load_1m_end")]
    loads = [v for v in loads if math.isfinite(v)]

    busy_block_fraction = len(busy) / n_blocks if n_blocks else 0.0
    run_busy = n_blocks > 0 and busy_block_fraction > run_fraction
    median_all = statistics.median(known) if known else math.nan
    median_busy = statistics.median(busy) if busy else math.nan
    message = ""
    if run_busy:
        message = (
            f"machine busy: other processes took {median_busy:.0%} of the CPUs in "
            f"{len(busy)} of {n_blocks} blocks (median {median_all:.0%}); timings are suspect"
        )
    return {
        "n_blocks": n_blocks,
        "n_unknown": n_blocks - len(known),
        "n_busy": len(busy),
        "busy_block_fraction": busy_block_fraction,
        "median_other_cpu_fraction": median_all,
        "median_busy_other_cpu_fraction": median_busy,
        "max_load_1m": max(loads) if loads else math.nan,
        "threshold": threshold,
        "run_fraction": run_fraction,
        "busy": run_busy,
        "message": message,
    }
