"""The memory verdict: bytes saved by the stack against the sum of the singles' savings.

Peak memory is fixed per process (RSS, or the GPU allocator's peak), so its unit of
replication is the process: rounds inside one process repeat the same number. Each
configuration gives one value per process (its peak over the process's blocks), and the
interval comes from the processes alone. Bytes freed by changes to disjoint parts of a model
add, so the null is additive, not eq 4.2. A difference counts only when it exceeds a
practical margin of both `margin_mib` MiB and `margin_fraction` of the baseline's peak.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bench.judge.replicated import Estimate, Rounds, estimate
from bench.judge.verdict import INCONCLUSIVE, departure
from core.jsonio import json_safe
from core.units import BYTES_PER_MIB

ADDITIVE = "additive"
SUB_ADDITIVE = "sub-additive"  # the stack frees less than the singles' sum
SUPER_ADDITIVE = "super-additive"
PEAK_METRICS = ("peak_allocated_bytes", "peak_rss_bytes")


@dataclass(frozen=True)
class MemoryVerdict:
    metric: str
    measured_bytes: Estimate | None  # base − stack
    predicted_bytes: Estimate | None  # Σ (base − single)
    residual_bytes: Estimate | None
    baseline_bytes: float
    margin_bytes: float
    word: str
    statement: str
    processes: int

    def to_dict(self) -> dict[str, Any]:
        out = {k: (v.to_dict() if isinstance(v, Estimate) else v) for k, v in self.__dict__.items()}
        return json_safe(out)


def memory_verdict(
    processes_table: Rounds,
    metric: str,
    baseline: str,
    singles: Sequence[str],
    stack: str,
    margin_mib: float,
    margin_fraction: float,
) -> MemoryVerdict:
    """Judge whether the stack frees the sum of what the singles free, per process."""
    names = [baseline, *singles, stack]
    complete = processes_table.table[names].dropna()
    base = float(complete[baseline].mean()) if len(complete) else math.nan
    margin = max(margin_mib * BYTES_PER_MIB, margin_fraction * base)
    processes = len(complete)

    def freed(c: Mapping[str, np.ndarray], name: str) -> float:
        return float(np.mean(c[baseline] - c[name]))

    def predicted(c: Mapping[str, np.ndarray]) -> float:
        return sum(freed(c, s) for s in singles)

    if processes < 2:
        return MemoryVerdict(
            metric, None, None, None, base, margin, INCONCLUSIVE,
            f"{processes} process per configuration: peak memory is one value per process, "
            "so there is no interval; run with --processes 2 or more",
            processes,
        )  # fmt: skip
    rounds = Rounds(complete, pd.Series(complete.index, index=complete.index))
    measured = estimate(rounds, lambda c: freed(c, stack))
    summed = estimate(rounds, predicted)
    residual = estimate(rounds, lambda c: freed(c, stack) - predicted(c))
    word = _word(residual, margin)
    return MemoryVerdict(
        metric,
        measured,
        summed,
        residual,
        base,
        margin,
        word,
        _statement(word, measured, summed, residual, margin),
        processes,
    )


def _word(residual: Estimate, margin: float) -> str:
    """The time verdict's equivalence rule (`verdict.departure`), in words for bytes."""
    outcome = departure(residual, margin).outcome
    return {"within": ADDITIVE, "below": SUB_ADDITIVE, "above": SUPER_ADDITIVE}.get(
        outcome, INCONCLUSIVE
    )


def _mib(value: float) -> str:
    return f"{value / BYTES_PER_MIB:+.2f} MiB"


def _statement(
    word: str, measured: Estimate, summed: Estimate, residual: Estimate, margin: float
) -> str:
    numbers = (
        f"the stack frees {_mib(measured.point)}, the singles' sum {_mib(summed.point)}; "
        f"residual {_mib(residual.point)} [{_mib(residual.lo)}, {_mib(residual.hi)}] "
        f"against a ±{margin / BYTES_PER_MIB:.2f} MiB margin"
    )
    meaning = {
        ADDITIVE: "the savings add up",
        SUB_ADDITIVE: "the stack frees less than the sum",
        SUPER_ADDITIVE: "the stack frees more than the sum",
        INCONCLUSIVE: "cannot tell",
    }[word]
    return f"{meaning}: {numbers}"
