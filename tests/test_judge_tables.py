"""`compound judge` on tables with known answers: eq 4.2's product, the words of our verdict,
a sequential table giving its own cumulative figure back, and flags for steps that save less
once stacked."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.judge.external import TableError, judge_table

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _singles(stack: float, spread: float | None, without: dict[str, float] | None = None):
    """Baseline 100, singles saving 10% and 20% (eq 4.2: 28%), the stack at `stack`."""
    rows = [("baseline", "base", 100.0), ("single", "a", 90.0), ("single", "b", 80.0)]
    rows.append(("stack", "a+b", stack))
    rows += [("without", name, value) for name, value in (without or {}).items()]
    table = pd.DataFrame(rows, columns=["kind", "name", "value"])
    if spread is not None:  # a tight 95% interval on every row
        table["lo"], table["hi"] = table["value"] * (1 - spread), table["value"] * (1 + spread)
    return table


def test_a_stack_at_the_product_compounds():
    judgement = judge_table(_singles(72.0, 0.002), margin=0.02)
    assert judgement.predicted.point == pytest.approx(0.28)
    assert judgement.measured.point == pytest.approx(0.28)
    assert judgement.word == "compounds"
    assert judgement.residual.lo < 0 < judgement.residual.hi


@pytest.mark.parametrize(
    ("stack", "word"), [(60.0, "super-multiplicative"), (85.0, "sub-multiplicative")]
)
def test_a_stack_off_the_product_departs(stack, word):
    assert judge_table(_singles(stack, 0.002), margin=0.02).word == word


def test_no_uncertainty_is_inconclusive_and_says_why():
    judgement = judge_table(_singles(72.0, None), margin=0.02)
    assert judgement.word == "inconclusive" and "no uncertainty given" in judgement.reason


def test_raw_repeats_give_an_interval():
    rows = [("baseline", "base", v) for v in (99.0, 100.0, 101.0)]
    rows += [("single", "a", v) for v in (89.0, 90.0, 91.0)]
    rows += [("single", "b", v) for v in (79.0, 80.0, 81.0)]
    rows += [("stack", "a+b", v) for v in (71.0, 72.0, 73.0)]
    judgement = judge_table(pd.DataFrame(rows, columns=["kind", "name", "value"]), 0.05)
    assert judgement.residual.lo < 0 < judgement.residual.hi and judgement.word == "compounds"


def test_a_step_that_saves_less_once_stacked_is_flagged():
    # b saves 20% alone, but the stack (72) is only 4% below the stack without b (75)
    table = _singles(72.0, 0.002, without={"b": 75.0, "a": 80.0})
    judgement = judge_table(table, margin=0.02)
    assert len(judgement.flags) == 1 and judgement.flags[0].startswith("b: saves +20.0% alone")


def test_a_sequential_table_gives_its_own_cumulative_figure_back():
    table = pd.read_csv(EXAMPLES / "modded-nanogpt-records.csv", comment="#")
    judgement = judge_table(table, margin=0.02)
    assert judgement.shape == "sequential" and len(judgement.steps) == 17
    assert judgement.predicted.point == pytest.approx(1 - 3.4 / 45, abs=1e-12)
    assert judgement.measured.point == pytest.approx(1 - 3.4 / 45, abs=1e-12)
    assert judgement.word == "inconclusive" and "by construction" in judgement.reason


def test_throughputs_are_judged_as_costs():
    table = pd.DataFrame({"step": ["base", "compile"], "value": [25.0, 100.0]})
    assert judge_table(table, 0.02, higher_is_better=True).steps[0]["delta"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pd.DataFrame({"x": [1]}), "columns must be"),
        (pd.DataFrame({"kind": ["odd"], "name": ["a"], "value": [1.0]}), "unknown kind"),
        (pd.DataFrame({"step": ["a", "b"], "value": [1.0, -2.0]}), "positive number"),
        (pd.DataFrame({"step": ["a"], "value": [1.0]}), "at least one step"),
    ],
)
def test_tables_that_cannot_be_judged_say_why(table, message):
    with pytest.raises(TableError, match=message):
        judge_table(table, 0.02)


def test_the_command_prints_json_and_one_line_errors(tmp_path, capsys):
    assert main(["judge", str(EXAMPLES / "singles-and-stack.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shape"] == "singles+stack" and len(report["steps"]) == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("step,value\nbase,1\nnext,zero\n")
    assert main(["judge", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "positive number" in err
    assert main(["judge", str(tmp_path / "missing.csv")]) == 2
    assert "table not found" in capsys.readouterr().err
