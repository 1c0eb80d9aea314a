"""Known-answer tests for the verdict: planted multiplicative, super- and sub-multiplicative."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.judge.verdict import (
    ADDITIVE,
    BETTER_THAN_ADDITIVE,
    COMPOUNDS,
    SUB_MULTIPLICATIVE,
    SUPER_MULTIPLICATIVE,
    WORSE_THAN_ADDITIVE,
    accuracy_verdict,
    metric_verdict,
)

SINGLES = {"a": 0.10, "b": 0.15}  # eq 4.2 predicts 23.5%


def blocks(stack_saving: float, n: int = 30, sd: float = 0.01, seed: int = 0, singles=SINGLES):
    """Block values per configuration: shared per-round drift, 1% lognormal noise each."""
    rng = np.random.default_rng(seed)
    drift = rng.normal(0.0, 0.1, n)
    savings = {"base": 0.0, **singles, "stack": stack_saving}
    return {k: 50.0 * (1 - s) * np.exp(drift + rng.normal(0.0, sd, n)) for k, s in savings.items()}


def verdict(data, **kw):
    return metric_verdict("latency_ms", "ms", data, "base", list(SINGLES), "stack", **kw)


def test_exactly_multiplicative_compounds():
    row = verdict(blocks(0.235))
    assert row.word == COMPOUNDS
    assert row.predicted_independent.point == pytest.approx(0.235, abs=0.01)
    assert row.measured.point == pytest.approx(0.235, abs=0.01)
    assert row.residual.lo < 0 < row.residual.hi
    assert row.n_rounds == 30
    assert row.note == ""  # 1% noise resolves a 23.5% saving: no caveat due


def test_extra_saving_is_super_multiplicative():
    row = verdict(blocks(0.235 + 0.05))
    assert row.word == SUPER_MULTIPLICATIVE
    assert row.residual.point == pytest.approx(0.05, abs=0.01)
    assert row.residual.lo > 0


def test_shortfall_is_sub_multiplicative():
    row = verdict(blocks(0.235 - 0.05))
    assert row.word == SUB_MULTIPLICATIVE
    assert row.residual.point == pytest.approx(-0.05, abs=0.01)
    assert row.residual.hi < 0


def test_missing_rounds_dropped_across_all_configs():
    data = blocks(0.235 + 0.05)
    data["a"][[0, 3]] = np.nan
    data["stack"][7] = np.nan
    data["unrelated"] = np.full(30, np.nan)  # not part of this verdict: must not drop rounds
    row = verdict(data)
    assert row.n_rounds == 27
    assert row.word == SUPER_MULTIPLICATIVE


def test_weak_evidence_is_said_plainly():
    """1% singles under 10% noise: the word is "compounds" but only as "cannot tell"."""
    data = blocks(0.0199, sd=0.10, singles={"a": 0.01, "b": 0.01})
    row = metric_verdict("energy_j", "J", data, "base", ["a", "b"], "stack")
    assert row.word == COMPOUNDS
    assert "not distinguishable" in row.note


def test_unresolved_stack_is_said_plainly():
    """No planted saving at all under 5% noise: the stack's own CI straddles 0."""
    data = blocks(0.0, sd=0.05, singles={"a": 0.0, "b": 0.0})
    row = metric_verdict("energy_j", "J", data, "base", ["a", "b"], "stack")
    assert row.word == COMPOUNDS
    assert row.measured.lo < 0 < row.measured.hi
    assert "not resolved" in row.note


def test_hierarchical_prediction_outside_ci_noted_and_json():
    row = verdict(blocks(0.235), predicted_hierarchical=0.12)
    assert row.predicted_hierarchical == 0.12
    assert "hierarchical" in row.note
    d = json.loads(json.dumps(row.to_dict(), allow_nan=False))
    assert d["word"] == COMPOUNDS
    assert set(d["measured"]) == {"point", "lo", "hi"}
    assert d["residual"]["lo"] < 0 < d["residual"]["hi"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.pop("b"), "no values"),
        (lambda d: d["base"].__setitem__(0, 0.0), "> 0"),
    ],
)
def test_bad_input_rejected(change, match):
    data = blocks(0.235)
    change(data)
    with pytest.raises(ValueError, match=match):
        verdict(data)


def test_stack_listed_as_single_rejected():
    with pytest.raises(ValueError, match="distinct"):
        metric_verdict("m", "ms", blocks(0.235), "base", ["a", "stack"], "stack")


# --- accuracy ------------------------------------------------------------------------------


def correctness(stack_extra_wrong: int, n: int = 2000):
    """Baseline right on 1600; a and b each break 40 disjoint examples; the stack breaks both
    sets plus `stack_extra_wrong` more (negative: it keeps some of b's losses right)."""
    base = np.zeros(n, dtype=bool)
    base[:1600] = True
    a, b = base.copy(), base.copy()
    a[0:40] = False
    b[40:80] = False
    stack = a & b
    if stack_extra_wrong > 0:
        stack[80 : 80 + stack_extra_wrong] = False
    else:
        stack[40 : 40 - stack_extra_wrong] = True
    return {"base": base, "a": a, "b": b, "stack": stack}


def accuracy(data):
    return accuracy_verdict(data, "base", ["a", "b"], "stack")


def test_accuracy_additive():
    v = accuracy(correctness(0))
    assert v.word == ADDITIVE
    assert v.stacked_drop.point == pytest.approx(0.04)
    assert v.sum_single_drops.point == pytest.approx(0.04)
    assert v.difference.point == pytest.approx(0.0)
    assert v.n_examples == 2000
    assert v.stacked_drop.lo < 0.04 < v.stacked_drop.hi


def test_accuracy_worse_than_additive():
    v = accuracy(correctness(60))
    assert v.word == WORSE_THAN_ADDITIVE
    assert v.difference.point == pytest.approx(0.03)
    assert v.difference.lo > 0


def test_accuracy_better_than_additive():
    v = accuracy(correctness(-30))
    assert v.word == BETTER_THAN_ADDITIVE
    assert v.difference.point == pytest.approx(-0.015)
    assert v.difference.hi < 0
    json.dumps(v.to_dict(), allow_nan=False)


def test_accuracy_identical_outputs_noted():
    same = np.r_[np.ones(90, dtype=bool), np.zeros(10, dtype=bool)]
    v = accuracy({"base": same, "a": same, "b": same, "stack": same})
    assert v.word == ADDITIVE
    assert (v.difference.lo, v.difference.hi) == (0.0, 0.0)
    assert "zero-width" in v.note
