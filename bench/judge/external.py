"""Judging someone else's ablation table with the rules of our own verdict.

Two shapes of table (CSV):

- **sequential**: columns `step,value` (optionally `lo,hi`): the first row is the baseline,
  every later row adds one step to all the steps before it (a cumulative figure, e.g. a
  record time). Each step's Δ is 1 − value/previous. The eq 4.2 product of those Δ gives the
  last row back by construction (the ratios telescope), so such a table can state each
  step's gain on top of the others but can never show whether the steps compound: that needs
  each step measured alone. The judgement says so.
- **singles + stack**: columns `kind,name,value` (optionally `lo,hi`), kind one of
  `baseline`, `single` (a step alone), `stack` (all steps together) and `without` (the stack
  without that step, for its gain once stacked). A row repeated under the same kind and name
  holds raw repeats. Each single's Δ = 1 − single/baseline; eq 4.2 predicts the stack from
  them; the residual (measured − predicted) gets the word our verdict uses
  (`bench.judge.verdict.departure`): `compounds` only when its whole interval lies within
  ±margin.

Uncertainty: raw repeats are resampled (bootstrap), a row's `lo,hi` is read as a 95%
interval of a log-normal value. Rows with neither are exact, so with no uncertainty anywhere
the residual has no interval and the word is `inconclusive`, with the reason. Values are
costs (lower is better) unless `higher_is_better` (throughput: each value is inverted).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bench.judge.formulas import independent_saving
from bench.judge.replicated import Estimate
from bench.judge.verdict import COMPOUNDS, INCONCLUSIVE, SUB_MULTIPLICATIVE, SUPER_MULTIPLICATIVE
from bench.judge.verdict import departure as judge_departure

KINDS = ("baseline", "single", "stack", "without")
DRAWS = 20_000
Z95 = 1.959963984540054
WORDS = {"within": COMPOUNDS, "below": SUB_MULTIPLICATIVE, "above": SUPER_MULTIPLICATIVE}


class TableError(ValueError):
    """A table that cannot be judged; the message says what to fix."""


@dataclass(frozen=True)
class Interval:
    point: float
    lo: float = math.nan
    hi: float = math.nan

    @property
    def known(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)


@dataclass
class Judgement:
    shape: str  # "sequential" or "singles+stack"
    steps: list[dict[str, Any]]
    predicted: Interval  # eq 4.2 from the steps' Δ
    measured: Interval | None  # the stack's Δ (singles+stack) or the last row's (sequential)
    residual: Interval | None
    word: str
    reason: str
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _draws(
    values: list[float], lo: float, hi: float, rng: np.random.Generator
) -> np.ndarray | None:
    """Samples of one row's value: bootstrap means of its repeats, or log-normal from its
    95% interval; None when it carries no uncertainty."""
    if len(values) > 1:
        picks = rng.integers(0, len(values), size=(DRAWS, len(values)))
        return np.asarray(values)[picks].mean(axis=1)
    if math.isfinite(lo) and math.isfinite(hi):
        centre = math.log(values[0])
        sigma = (math.log(hi) - math.log(lo)) / (2 * Z95)
        return np.exp(rng.normal(centre, sigma, size=DRAWS))
    return None


@dataclass
class _Row:
    values: list[float]
    lo: float
    hi: float

    @property
    def point(self) -> float:
        return float(np.mean(self.values))


def _number(raw: Any, key: tuple, column: str) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise TableError(f"row {key}: {column} must be a positive number, got {raw!r}") from None


def _rows(table: pd.DataFrame, keys: list[str], higher_is_better: bool) -> dict[tuple, _Row]:
    rows: dict[tuple, _Row] = {}
    for record in table.to_dict(orient="records"):
        key = tuple(record[k] for k in keys)
        value, lo, hi = (_number(record.get(c, math.nan), key, c) for c in ("value", "lo", "hi"))
        if not (math.isfinite(value) and value > 0):
            raise TableError(f"row {key}: value must be a positive number, got {record['value']!r}")
        if math.isfinite(lo) != math.isfinite(hi) or (math.isfinite(lo) and not 0 < lo <= hi):
            raise TableError(f"row {key}: lo and hi must both be given, with 0 < lo <= hi")
        if higher_is_better:  # a throughput: judge its inverse, a cost
            value, lo, hi = (
                1 / value,
                (1 / hi if math.isfinite(hi) else lo),
                (1 / lo if math.isfinite(lo) else hi),
            )
        row = rows.setdefault(key, _Row([], lo, hi))
        row.values.append(value)
    return rows


def _interval(point: float, samples: np.ndarray | None) -> Interval:
    if samples is None:
        return Interval(point)
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return Interval(point, float(lo), float(hi))


def judge_sequential(table: pd.DataFrame, higher_is_better: bool = False) -> Judgement:
    rows = _rows(table, ["step"], higher_is_better)
    names = list(dict.fromkeys(table["step"]))
    if len(names) < 2:
        raise TableError("a sequential table needs a baseline row and at least one step")
    rng = np.random.default_rng(0)
    draws = {
        name: _draws(rows[(name,)].values, rows[(name,)].lo, rows[(name,)].hi, rng)
        for name in names
    }
    steps = []
    for previous, name in zip(names, names[1:], strict=False):
        delta = 1 - rows[(name,)].point / rows[(previous,)].point
        after, before = draws[name], draws[previous]
        samples = None
        if after is not None or before is not None:
            after = after if after is not None else np.full(DRAWS, rows[(name,)].point)
            before = before if before is not None else np.full(DRAWS, rows[(previous,)].point)
            samples = 1 - after / before
        steps.append({"step": name, "delta": delta, **_bounds(_interval(delta, samples))})
    predicted = float(independent_saving([s["delta"] for s in steps]))
    measured = 1 - rows[(names[-1],)].point / rows[(names[0],)].point
    return Judgement(
        shape="sequential",
        steps=steps,
        predicted=Interval(predicted),
        measured=Interval(measured),
        residual=Interval(measured - predicted),
        word=INCONCLUSIVE,
        reason=(
            "a sequential table measures each step on top of the ones before it, so eq 4.2 "
            "gives its last row back by construction; whether the steps compound needs each "
            "measured alone (a singles + stack table)"
        ),
    )


def _bounds(interval: Interval) -> dict[str, float]:
    return {"lo": interval.lo, "hi": interval.hi}


def judge_singles(table: pd.DataFrame, margin: float, higher_is_better: bool = False) -> Judgement:
    unknown = sorted(set(table["kind"]) - set(KINDS))
    if unknown:
        raise TableError(f"unknown kind {unknown[0]!r}; kinds: {', '.join(KINDS)}")
    rows = _rows(table, ["kind", "name"], higher_is_better)
    kinds = {kind: [name for (k, name) in rows if k == kind] for kind in KINDS}
    if len(kinds["baseline"]) != 1 or len(kinds["stack"]) != 1 or len(kinds["single"]) < 2:
        raise TableError("a singles + stack table needs one baseline, one stack and 2+ singles")
    rng = np.random.default_rng(0)

    def samples(kind: str, name: str) -> np.ndarray:
        row = rows[(kind, name)]
        drawn = _draws(row.values, row.lo, row.hi, rng)
        return drawn if drawn is not None else np.full(DRAWS, row.point)

    def uncertain(kind: str, name: str) -> bool:
        row = rows[(kind, name)]
        return len(row.values) > 1 or math.isfinite(row.lo)

    base_name, stack_name = kinds["baseline"][0], kinds["stack"][0]
    base = samples("baseline", base_name)
    any_uncertainty = any(uncertain(kind, name) for (kind, name) in rows)
    single_samples = {name: 1 - samples("single", name) / base for name in kinds["single"]}
    base_point = rows[("baseline", base_name)].point
    steps = []
    for name in kinds["single"]:
        delta = 1 - rows[("single", name)].point / base_point
        steps.append(
            {
                "step": name,
                "delta": delta,
                **_bounds(_interval(delta, single_samples[name] if any_uncertainty else None)),
            }
        )
    measured_point = 1 - rows[("stack", stack_name)].point / base_point
    stack_samples = 1 - samples("stack", stack_name) / base
    predicted_point = float(independent_saving([s["delta"] for s in steps]))
    predicted_samples = independent_saving(np.stack([single_samples[n] for n in kinds["single"]]))
    residual_point = measured_point - predicted_point
    flags = _stacked_flags(
        rows, kinds, samples, single_samples, stack_samples, margin, any_uncertainty
    )
    if not any_uncertainty:
        return Judgement(
            "singles+stack",
            steps,
            Interval(predicted_point),
            Interval(measured_point),
            Interval(residual_point),
            INCONCLUSIVE,
            "no uncertainty given (no lo/hi, no repeats): a residual of "
            f"{residual_point:+.1%} cannot be told from noise",
            flags,
        )
    residual = _interval(residual_point, stack_samples - predicted_samples)
    estimate = Estimate(residual.point, residual.lo, residual.hi, math.nan, 0, 0, 0, "table", False)
    judged = judge_departure(estimate, margin)
    word = WORDS.get(judged.outcome, INCONCLUSIVE)
    reason = (
        f"residual {residual.point:+.1%} [{residual.lo:+.1%}, {residual.hi:+.1%}] against a "
        f"±{margin:.1%} margin"
    )
    if word == INCONCLUSIVE:
        reason += f" (a ±{judged.margin_needed:.1%} margin would have been needed)"
    return Judgement(
        "singles+stack",
        steps,
        _interval(predicted_point, predicted_samples),
        _interval(measured_point, stack_samples),
        residual,
        word,
        reason,
        flags,
    )


def _stacked_flags(
    rows, kinds, samples, single_samples, stack_samples, margin, uncertain
) -> list[str]:
    """A step whose gain once stacked (stack vs stack without it) differs from its gain alone."""
    flags = []
    stack_name = kinds["stack"][0]
    for name in kinds["without"]:
        if name not in kinds["single"]:
            raise TableError(f"'without' row {name!r} has no 'single' row to compare with")
        alone = 1 - rows[("single", name)].point / rows[("baseline", kinds["baseline"][0])].point
        stacked = 1 - rows[("stack", stack_name)].point / rows[("without", name)].point
        difference = stacked - alone
        if uncertain:
            drawn = (1 - samples("stack", stack_name) / samples("without", name)) - single_samples[
                name
            ]
            lo, hi = np.percentile(drawn, [2.5, 97.5])
            differs = lo > 0 or hi < 0
            detail = f"[{lo:+.1%}, {hi:+.1%}]"
        else:
            differs = abs(difference) > margin
            detail = f"(no uncertainty given; beyond the ±{margin:.1%} margin)"
        if differs:
            flags.append(
                f"{name}: saves {alone:+.1%} alone but {stacked:+.1%} once stacked "
                f"(difference {difference:+.1%} {detail})"
            )
    return flags


def judge_table(table: pd.DataFrame, margin: float, higher_is_better: bool = False) -> Judgement:
    """The judgement of a table of either shape (told apart by its columns)."""
    columns = set(table.columns)
    if {"kind", "name", "value"} <= columns:
        return judge_singles(table, margin, higher_is_better)
    if {"step", "value"} <= columns:
        return judge_sequential(table, higher_is_better)
    raise TableError(
        "columns must be step,value[,lo,hi] (sequential) or kind,name,value[,lo,hi] "
        f"(singles + stack); got {','.join(table.columns)}"
    )
