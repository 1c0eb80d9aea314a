"""Known-answer tests for the verdict: planted multiplicative, super- and sub-multiplicative,
inconclusive under noise, and plain words when the singles are not savings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bench.judge.replicated import Rounds
from bench.judge.verdict import (
    COMPOUNDS,
    INCONCLUSIVE,
    NOT_SAVINGS_DEARER,
    SUB_MULTIPLICATIVE,
    SUPER_MULTIPLICATIVE,
    metric_verdict,
)

SINGLES = {"a": 0.10, "b": 0.15}  # eq 4.2 predicts 23.5%
PROCESSES, PER_PROCESS = 6, 5


def blocks(
    stack_saving: float,
    sd: float = 0.01,
    tau: float = 0.002,
    seed: int = 0,
    singles: dict[str, float] = SINGLES,
) -> Rounds:
    """Block values: shared per-round drift, a per-process offset τ and round noise sd."""
    rng = np.random.default_rng(seed)
    epochs = np.repeat(np.arange(PROCESSES), PER_PROCESS)
    drift = rng.normal(0.0, 0.1, epochs.size)
    savings = {"base": 0.0, **singles, "stack": stack_saving}
    table = {
        k: 50.0
        * (1 - s)
        * np.exp(
            drift + tau * rng.standard_normal(PROCESSES)[epochs] + rng.normal(0, sd, epochs.size)
        )
        for k, s in savings.items()
    }
    frame = pd.DataFrame(table)
    return Rounds(frame, pd.Series(epochs, index=frame.index))


def verdict(rounds: Rounds, **kw):
    return metric_verdict("latency_ms", "ms", rounds, "base", list(SINGLES), "stack", **kw)


def test_exactly_multiplicative_compounds():
    row = verdict(blocks(0.235))
    assert row.word == COMPOUNDS
    assert row.predicted_independent.point == pytest.approx(0.235, abs=0.01)
    assert row.measured.point == pytest.approx(0.235, abs=0.01)
    assert -0.02 < row.residual.lo < row.residual.hi < 0.02
    assert row.interaction_ratio.lo < 1 < row.interaction_ratio.hi
    assert row.residual.processes == PROCESSES and row.residual.rounds == 30
    assert row.notes == []
    assert "matches the product" in row.statement


def test_extra_saving_is_super_multiplicative():
    row = verdict(blocks(0.235 + 0.05))
    assert row.word == SUPER_MULTIPLICATIVE
    assert row.residual.point == pytest.approx(0.05, abs=0.01)
    assert row.interaction_ratio.point == pytest.approx(0.715 / 0.765, abs=0.01)
    assert "savings amplify" in row.statement


def test_shortfall_is_sub_multiplicative():
    row = verdict(blocks(0.235 - 0.05))
    assert row.word == SUB_MULTIPLICATIVE
    assert row.residual.hi < 0


def test_missing_rounds_dropped_across_all_configs():
    rounds = blocks(0.235 + 0.05)
    rounds.table.loc[[0, 3], "a"] = np.nan
    rounds.table.loc[7, "stack"] = np.nan
    rounds.table["unrelated"] = np.nan  # not part of this verdict: must not drop rounds
    row = verdict(rounds)
    assert row.residual.rounds == 27
    assert row.word == SUPER_MULTIPLICATIVE


def test_noise_gives_inconclusive_never_compounds():
    """1% singles under 10% round noise and 3% process offsets: the data cannot tell."""
    rounds = blocks(0.0199, sd=0.10, tau=0.03, singles={"a": 0.01, "b": 0.01})
    row = metric_verdict("energy_j", "J", rounds, "base", ["a", "b"], "stack")
    assert row.word == INCONCLUSIVE
    assert row.margin_needed > row.margin
    assert "would have been needed" in row.statement


def test_a_wider_margin_fixed_beforehand_can_accept_what_a_narrow_one_cannot():
    rounds = blocks(0.235, sd=0.03, tau=0.01)
    wide = verdict(rounds, margin=0.20)
    narrow = verdict(rounds, margin=0.001)
    assert wide.word == COMPOUNDS and narrow.word == INCONCLUSIVE


def test_regressions_get_plain_words():
    rounds = blocks(-0.30, singles={"a": -0.10, "b": -0.08})  # product: −18.8%
    row = metric_verdict("latency_ms", "ms", rounds, "base", ["a", "b"], "stack")
    assert row.word == NOT_SAVINGS_DEARER
    assert "all 2 singles are regressions" in row.statement and "more than" in row.statement
    assert "multiplicative" not in row.word


def test_hierarchical_prediction_outside_ci_noted_and_json():
    rounds = blocks(0.235)
    hierarchical = verdict(rounds).measured.mapped(lambda v: v - 0.1, increasing=True)
    row = verdict(rounds, predicted_hierarchical=hierarchical)
    assert any("hierarchical" in note for note in row.notes)
    d = json.loads(json.dumps(row.to_dict(), allow_nan=False))
    assert d["word"] == COMPOUNDS
    assert {"point", "lo", "hi", "processes", "method"} <= set(d["measured"])
    assert d["predicted_hierarchical"]["point"] == pytest.approx(hierarchical.point)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.__delitem__("b"), "no values"),
        (lambda t: t.__setitem__("base", t["base"].where(t.index != 0, 0.0)), "> 0"),
    ],
)
def test_bad_input_rejected(change, match):
    rounds = blocks(0.235)
    change(rounds.table)
    with pytest.raises(ValueError, match=match):
        verdict(rounds)


def test_stack_listed_as_single_rejected():
    with pytest.raises(ValueError, match="distinct"):
        metric_verdict("m", "ms", blocks(0.235), "base", ["a", "stack"], "stack")
