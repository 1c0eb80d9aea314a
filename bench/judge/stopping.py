"""The sequential rule on a real run: after a planned look, is the latency residual decisive?

A run with `protocol.sequential` looks at its latency residual after half, three quarters
and all of its planned processes (`sequential.look_points`), each time with the interval the
alpha spending allows, and stops at the first look whose interval is decisive against the
margin. The final analysis then states the residual at the confidence of the look that
ended the run (`residual_confidence`), so the interval printed is the one that decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from bench.designs import BASELINE, config_name
from bench.judge.analysis import rounds_of
from bench.judge.replicated import CONFIDENCE, locations
from bench.judge.sequential import look_confidence, look_points
from bench.judge.verdict import INCONCLUSIVE, departure, residual_estimate

METRIC = "latency_mean_s"
FEWEST_PLANNED = 3  # with fewer processes there is nothing to look early at


@dataclass(frozen=True)
class Look:
    processes: int
    confidence: float
    outcome: str  # a `verdict.departure` outcome; inconclusive goes on
    residual: list[float]  # point, lo, hi

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sequential_applies(planned: int) -> bool:
    return planned >= FEWEST_PLANNED


def latency_look(
    samples: pd.DataFrame, singles: Sequence[str], processes: int, planned: int, margin: float
) -> Look | None:
    """The look after `processes` of `planned`, over the singles measured so far and their
    stack; None when the baseline, a single or the stack has no located values yet."""
    confidence = look_confidence(processes, planned, final=False)
    stack = config_name(list(singles))
    names = [BASELINE, *singles, stack]
    located = locations(rounds_of(samples, METRIC))
    if located.table.empty or any(n not in located.table for n in names):
        return None
    joint = located.select(names)
    if joint.n_epochs < 2:
        return None
    residual = residual_estimate(joint, BASELINE, list(singles), stack, confidence)
    outcome = departure(residual, margin).outcome
    return Look(processes, confidence, outcome, [residual.point, residual.lo, residual.hi])


def decisive(look: Look | None) -> bool:
    return look is not None and look.outcome != INCONCLUSIVE


def residual_confidence(planned: int, processes: int, decided_after: int | None) -> float:
    """The confidence the final residual is stated at: the deciding look's, or, when no look
    decided, the last analysis's (it spends what the looks before it left)."""
    if not sequential_applies(planned) or processes < 2:
        return CONFIDENCE
    if decided_after is not None:
        return look_confidence(decided_after, planned, final=False)
    return look_confidence(processes, planned, final=True)


def planned_looks(planned: int) -> list[int]:
    return list(look_points(planned)) if sequential_applies(planned) else []
