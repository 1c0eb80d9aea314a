"""Verdicts: does the measured stack save what the singles predict (eq 4.2), within the noise?

The measured stack's saving and its interval come from `stats.paired_delta`, the one estimator
of a configuration against the baseline that every table uses. The prediction and the residual
come from one joint bootstrap over rounds (the same resampled rounds for the baseline, each
single and the stack), so the prediction's uncertainty and its correlation with the
measurement are carried into the residual. The word is judged by the residual's
interval, never its point, and a note says when "compounds" only means "cannot tell".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from bench.judge.formulas import independent_saving
from bench.judge.stats import (
    DEFAULT_RESAMPLES,
    DeltaEstimate,
    joint_bootstrap,
    paired_accuracy_drop,
    paired_delta,
    saving_from_log_ratio,
)
from core.jsonio import json_safe

COMPOUNDS = "compounds"
SUB_MULTIPLICATIVE = "sub-multiplicative"
SUPER_MULTIPLICATIVE = "super-multiplicative"
ADDITIVE = "additive"
WORSE_THAN_ADDITIVE = "worse-than-additive"
BETTER_THAN_ADDITIVE = "better-than-additive"


class Interval(NamedTuple):
    """A point estimate and its confidence interval."""

    point: float
    lo: float
    hi: float

    @classmethod
    def of(cls, est: DeltaEstimate) -> Interval:
        return cls(est.point, est.lo, est.hi)

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def contains(self, value: float) -> bool:
        return bool(self.lo <= value <= self.hi)


@dataclass(frozen=True)
class VerdictRow:
    """One metric's verdict: measured stack vs the eq 4.2 prediction from the singles."""

    metric: str
    unit: str
    measured: Interval
    predicted_independent: Interval
    predicted_hierarchical: float | None
    residual: Interval
    word: str
    note: str
    n_rounds: int

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            asdict(self) | _intervals(self, "measured", "predicted_independent", "residual")
        )


@dataclass(frozen=True)
class AccuracyVerdict:
    """Stacked accuracy drop vs the sum of single drops, paired by example."""

    stacked_drop: Interval
    sum_single_drops: Interval
    difference: Interval
    word: str
    note: str
    n_examples: int

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            asdict(self) | _intervals(self, "stacked_drop", "sum_single_drops", "difference")
        )


def _intervals(row: Any, *fields: str) -> dict[str, dict[str, float]]:
    """asdict flattens NamedTuples to lists; JSON readers want named bounds."""
    return {f: getattr(row, f)._asdict() for f in fields}


def _check_names(
    data: Mapping[str, Any], baseline: str, singles: Sequence[str], stack: str
) -> list[str]:
    names = [baseline, *singles, stack]
    if not singles:
        raise ValueError("a verdict needs at least one single transform")
    if len(set(names)) != len(names):
        raise ValueError(f"baseline, singles and stack must be distinct configurations: {names}")
    missing = [n for n in names if n not in data]
    if missing:
        raise ValueError(f"no values for configuration(s) {missing}; have {sorted(data)}")
    return names


def _judge(interval: Interval, inside: str, below: str, above: str) -> str:
    if interval.hi < 0:
        return below
    if interval.lo > 0:
        return above
    return inside


def _saving(c: Mapping[str, np.ndarray], baseline: str, name: str) -> np.ndarray:
    """Per-resample saving of `name` vs baseline: 1 − geometric mean of per-round ratios."""
    return saving_from_log_ratio(np.mean(np.log(c[name] / c[baseline]), axis=-1))


def metric_verdict(
    metric: str,
    unit: str,
    block_values: Mapping[str, ArrayLike],
    baseline: str,
    singles: Sequence[str],
    stack: str,
    predicted_hierarchical: float | None = None,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> VerdictRow:
    """Judge whether the stack's saving on one cost metric (lower is better) matches eq 4.2.

    `block_values` maps configuration → block values indexed by round. The measured saving
    uses the rounds the baseline and the stack both have (as every comparison does); the
    prediction and the residual drop rounds missing (NaN) in any of baseline, singles or stack.
    """
    names = _check_names(block_values, baseline, singles, stack)
    data = {n: np.asarray(block_values[n], dtype=float) for n in names}
    nonpositive = [n for n, v in data.items() if np.nanmin(v, initial=np.inf) <= 0]
    if nonpositive:
        raise ValueError(f"{metric}: values must be > 0 to form ratios; see {nonpositive}")

    def measured_stat(c: Mapping[str, np.ndarray]) -> np.ndarray:
        return _saving(c, baseline, stack)

    def predicted_stat(c: Mapping[str, np.ndarray]) -> np.ndarray:
        return independent_saving([_saving(c, baseline, s) for s in singles])

    kw = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    measured = paired_delta(data[baseline], data[stack], **kw)
    predicted = joint_bootstrap(data, predicted_stat, **kw)
    residual = joint_bootstrap(data, lambda c: measured_stat(c) - predicted_stat(c), **kw)
    m, p, r = Interval.of(measured), Interval.of(predicted), Interval.of(residual)
    word = _judge(r, COMPOUNDS, SUB_MULTIPLICATIVE, SUPER_MULTIPLICATIVE)
    return VerdictRow(
        metric=metric,
        unit=unit,
        measured=m,
        predicted_independent=p,
        predicted_hierarchical=predicted_hierarchical,
        residual=r,
        word=word,
        note=_metric_note(m, p, r, word, predicted_hierarchical),
        n_rounds=residual.n_pairs,
    )


def _metric_note(
    m: Interval, p: Interval, r: Interval, word: str, hierarchical: float | None
) -> str:
    """Say plainly when the evidence is too weak for the word to mean much.

    The residual's width counts too: it also carries the singles' noise, so a tight
    measurement can still leave "compounds" unable to tell the prediction from no saving.
    """
    notes = []
    if m.contains(0.0):
        notes.append("the stacked saving itself is not resolved (its CI includes 0)")
    width = max(m.half_width, r.half_width)
    if word == COMPOUNDS and width > abs(p.point):
        notes.append(
            f"CI half-width {width:.4f} (measured or residual) exceeds |prediction| "
            f"{abs(p.point):.4f}: 'compounds' means not distinguishable, not confirmed"
        )
    if hierarchical is not None and not m.contains(hierarchical):
        notes.append(f"hierarchical prediction {hierarchical:.4f} lies outside the measured CI")
    return "; ".join(notes)


def accuracy_verdict(
    correct: Mapping[str, ArrayLike],
    baseline: str,
    singles: Sequence[str],
    stack: str,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> AccuracyVerdict:
    """Judge whether accuracy drops add up: stacked drop vs Σ single drops, paired by example.

    `correct` maps configuration → per-example correctness (bool, or NaN where unscored)
    on the same examples in the same order.
    """
    names = _check_names(correct, baseline, singles, stack)
    data = {n: np.asarray(correct[n], dtype=float) for n in names}

    def drop(c: Mapping[str, np.ndarray], name: str) -> np.ndarray:
        return np.mean(c[baseline] - c[name], axis=-1)

    def summed(c: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.sum([drop(c, s) for s in singles], axis=0)

    kw = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    stacked = paired_accuracy_drop(data[baseline], data[stack], **kw)
    total = joint_bootstrap(data, summed, **kw)
    diff = joint_bootstrap(data, lambda c: drop(c, stack) - summed(c), **kw)
    s, t, d = Interval.of(stacked), Interval.of(total), Interval.of(diff)
    word = _judge(d, ADDITIVE, BETTER_THAN_ADDITIVE, WORSE_THAN_ADDITIVE)
    return AccuracyVerdict(s, t, d, word, _accuracy_note(d, t, word), diff.n_pairs)


def _accuracy_note(d: Interval, t: Interval, word: str) -> str:
    if d.half_width == 0:
        return (
            "zero-width CI: the per-example difference is the same on every example, so the "
            "bootstrap shows no spread; it does not bound the effect on unseen examples"
        )
    if word == ADDITIVE and d.half_width > abs(t.point):
        return (
            f"difference CI half-width {d.half_width:.4f} exceeds |summed single drops| "
            f"{abs(t.point):.4f}: 'additive' means not distinguishable, not confirmed"
        )
    return ""
