"""Verdicts: does the measured stack save what the singles predict (eq 4.2), within a margin?

Every figure comes from `bench.judge.replicated`, so its interval includes the variance
between worker processes. The word is an equivalence judgement (two one-sided tests) on the
residual = measured − predicted saving, against a margin fixed before the run:

- `compounds`: the whole interval lies within ±margin;
- `sub-multiplicative` / `super-multiplicative`: the interval lies below / above 0;
- `inconclusive`: neither; `margin_needed` says what margin the data could have supported.

A wider interval therefore makes `inconclusive` more likely, never `compounds`. The words
describe savings; when a single is not a resolved saving (a regression, or unresolved),
the word says so plainly and compares the stack with the product of the singles instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.judge.formulas import independent_saving
from bench.judge.replicated import (
    CONFIDENCE,
    Estimate,
    Rounds,
    Statistic,
    estimate,
    saving,
    saving_from_log,
)
from core.jsonio import json_safe

COMPOUNDS = "compounds"
SUB_MULTIPLICATIVE = "sub-multiplicative"
SUPER_MULTIPLICATIVE = "super-multiplicative"
INCONCLUSIVE = "inconclusive"
# When the singles are not all resolved savings: the stack against the singles' product.
NOT_SAVINGS_MATCH = "singles not savings: stack matches their product"
NOT_SAVINGS_CHEAPER = "singles not savings: stack cheaper than their product"
NOT_SAVINGS_DEARER = "singles not savings: stack dearer than their product"
DEFAULT_MARGIN = 0.02


@dataclass(frozen=True)
class Departure:
    """The equivalence judgement of one residual interval against a margin."""

    outcome: str  # "within", "below", "above" or "inconclusive"
    margin: float
    margin_needed: float


def departure(residual: Estimate, margin: float) -> Departure:
    """TOST: within ±margin first (practically equal, even if the interval excludes 0)."""
    needed = max(abs(residual.lo), abs(residual.hi))
    if not (math.isfinite(residual.lo) and math.isfinite(residual.hi)):
        return Departure(INCONCLUSIVE, margin, math.nan)
    if -margin < residual.lo and residual.hi < margin:
        return Departure("within", margin, needed)
    if residual.hi < 0:
        return Departure("below", margin, needed)
    if residual.lo > 0:
        return Departure("above", margin, needed)
    return Departure(INCONCLUSIVE, margin, needed)


@dataclass(frozen=True)
class VerdictRow:
    """One metric's verdict: measured stack vs the eq 4.2 prediction from the singles."""

    metric: str
    unit: str
    measured: Estimate
    singles: dict[str, Estimate]
    predicted_independent: Estimate
    residual: Estimate
    interaction_ratio: Estimate  # stack's cost ratio / product of the singles' cost ratios
    word: str
    statement: str
    margin: float
    margin_needed: float
    predicted_hierarchical: Estimate | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric,
            "unit": self.unit,
            "word": self.word,
            "statement": self.statement,
            "margin": self.margin,
            "margin_needed": self.margin_needed,
            "note": "; ".join(self.notes),
        }
        for name in ("measured", "predicted_independent", "residual", "interaction_ratio"):
            out[name] = getattr(self, name).to_dict()
        out["singles"] = {name: e.to_dict() for name, e in self.singles.items()}
        hierarchical = self.predicted_hierarchical
        out["predicted_hierarchical"] = hierarchical.to_dict() if hierarchical else None
        out["processes"] = self.residual.processes
        out["n_rounds"] = self.residual.rounds
        return json_safe(out)


def _log_ratios(c: Mapping[str, np.ndarray], baseline: str, names: Sequence[str]) -> list[float]:
    return [float(np.mean(np.log(c[n] / c[baseline]))) for n in names]


def _predicted(baseline: str, singles: Sequence[str]) -> Statistic:
    """eq 4.2 from the singles' savings."""

    def statistic(c: Mapping[str, np.ndarray]) -> float:
        savings = [saving_from_log(v) for v in _log_ratios(c, baseline, singles)]
        return float(independent_saving(np.array(savings)))

    return statistic


def _residual(baseline: str, singles: Sequence[str], stack: str) -> Statistic:
    """Measured stack saving − the eq 4.2 prediction."""
    predicted = _predicted(baseline, singles)

    def statistic(c: Mapping[str, np.ndarray]) -> float:
        return saving_from_log(_log_ratios(c, baseline, [stack])[0]) - predicted(c)

    return statistic


def residual_estimate(
    rows: Rounds,
    baseline: str,
    singles: Sequence[str],
    stack: str,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """The residual with its interval at `confidence` (a sequential look asks for more)."""
    return estimate(rows, _residual(baseline, singles, stack), confidence)


def metric_verdict(
    metric: str,
    unit: str,
    rounds: Rounds,
    baseline: str,
    singles: Sequence[str],
    stack: str,
    margin: float = DEFAULT_MARGIN,
    predicted_hierarchical: Estimate | None = None,
    confidence: float = CONFIDENCE,
) -> VerdictRow:
    """Judge whether the stack's saving on one cost metric (lower is better) matches eq 4.2.

    `rounds` holds per-process locations (`replicated.locations`; rounds for a one-process
    run). Prediction, residual and interaction ratio are computed on the processes where the
    baseline, every single and the stack were all measured, and their intervals from one
    resampling of processes, so the prediction's uncertainty and its correlation with the
    measurement are carried into the residual. `confidence` is the residual's and the ratio's
    (a sequential look widens them; `bench.judge.sequential`).
    """
    names = [baseline, *singles, stack]
    if not singles:
        raise ValueError("a verdict needs at least one single transform")
    if len(set(names)) != len(names):
        raise ValueError(f"baseline, singles and stack must be distinct configurations: {names}")
    joint = rounds.select(names)
    nonpositive = [n for n in names if (joint.table[n] <= 0).any()]
    if nonpositive:
        raise ValueError(f"{metric}: values must be > 0 to form ratios; see {nonpositive}")

    def log_interaction(c: Mapping[str, np.ndarray]) -> float:
        logs = _log_ratios(c, baseline, [stack, *singles])
        return logs[0] - sum(logs[1:])

    single_estimates = {s: saving(joint, baseline, s) for s in singles}
    row_measured = saving(joint, baseline, stack)
    row_predicted = estimate(joint, _predicted(baseline, singles))
    residual = residual_estimate(joint, baseline, singles, stack, confidence)
    ratio = estimate(joint, log_interaction, confidence).mapped(math.exp, increasing=True)
    judged = departure(residual, margin)
    resolved = all(e.lo > 0 for e in single_estimates.values())
    word = _word(judged, resolved)
    return VerdictRow(
        metric=metric,
        unit=unit,
        measured=row_measured,
        singles=single_estimates,
        predicted_independent=row_predicted,
        residual=residual,
        interaction_ratio=ratio,
        word=word,
        statement=_statement(judged, resolved, single_estimates, ratio, residual),
        margin=margin,
        margin_needed=judged.margin_needed,
        predicted_hierarchical=predicted_hierarchical,
        notes=_notes(row_measured, residual, predicted_hierarchical),
    )


def _word(judged: Departure, resolved: bool) -> str:
    if judged.outcome == INCONCLUSIVE:
        return INCONCLUSIVE
    if resolved:
        return {"within": COMPOUNDS, "below": SUB_MULTIPLICATIVE, "above": SUPER_MULTIPLICATIVE}[
            judged.outcome
        ]
    return {"within": NOT_SAVINGS_MATCH, "below": NOT_SAVINGS_DEARER, "above": NOT_SAVINGS_CHEAPER}[
        judged.outcome
    ]


def describe_singles(singles: Mapping[str, Estimate]) -> str:
    """'3 singles are regressions', '1 of 3 singles is a regression, 1 unresolved', ..."""
    n = len(singles)
    regressions = sum(e.hi < 0 for e in singles.values())
    savings = sum(e.lo > 0 for e in singles.values())
    unresolved = n - regressions - savings
    if savings == n:
        return f"all {n} singles are resolved savings"
    if regressions == n:
        return f"all {n} singles are regressions"
    parts = []
    if savings:
        parts.append(f"{savings} saving{'s' if savings > 1 else ''}")
    if regressions:
        parts.append(f"{regressions} regression{'s' if regressions > 1 else ''}")
    if unresolved:
        parts.append(f"{unresolved} unresolved")
    return f"of {n} singles: " + ", ".join(parts)


def _statement(
    judged: Departure,
    resolved: bool,
    singles: Mapping[str, Estimate],
    ratio: Estimate,
    residual: Estimate,
) -> str:
    """The word in plain terms, with the numbers behind it."""
    ratio_text = f"stack/product of singles {ratio.point:.3f} [{ratio.lo:.3f}, {ratio.hi:.3f}]"
    margin_pp = 100 * judged.margin
    needed_pp = 100 * judged.margin_needed
    if judged.outcome == INCONCLUSIVE:
        return (
            f"{describe_singles(singles)}; cannot tell: the residual "
            f"{100 * residual.point:+.1f} pp [{100 * residual.lo:+.1f}, {100 * residual.hi:+.1f}] "
            f"neither lies within ±{margin_pp:.1f} pp nor excludes 0 (a ±{needed_pp:.1f} pp "
            f"margin would have been needed); {ratio_text}"
        )
    if judged.outcome == "within":
        what = f"the stack matches the product of the singles within ±{margin_pp:.1f} pp"
    else:
        change = abs(1 - ratio.point)
        cheaper = ratio.point < 1
        what = f"the stack costs {change:.1%} {'less' if cheaper else 'more'} than their product"
        if resolved:
            what += " (savings amplify)" if cheaper else " (savings overlap)"
    return f"{describe_singles(singles)}; {what}; {ratio_text}"


def _notes(measured: Estimate, residual: Estimate, hierarchical: Estimate | None) -> list[str]:
    notes = []
    if measured.lo <= 0 <= measured.hi:
        notes.append("the stacked saving itself is not resolved (its interval includes 0)")
    if not residual.includes_process_variance:
        notes.append(
            "one process per configuration: the interval covers rounds only and is too narrow"
        )
    if hierarchical is not None and not (measured.lo <= hierarchical.point <= measured.hi):
        notes.append(
            f"hierarchical prediction {hierarchical.point:+.4f} lies outside the measured interval"
        )
    return notes
