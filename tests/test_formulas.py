"""The compounding formulas: the paper's worked numbers, their algebra, and `compound formula`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.cli import main
from bench.judge.formulas import (
    PAPER_EXAMPLES,
    READINGS,
    ModuleSaving,
    compound_growth,
    compound_hierarchical,
    compound_independent,
    compound_modules,
    compound_weighted,
    independent_saving,
    modules_needed,
)
from core.errors import CompoundError

savings = st.floats(min_value=0.0, max_value=0.9, allow_nan=False)
# Up to 12 savings of at most 90% keep Π(1 − Δ) ≥ 1e-12, so "< 1" is representable in floats.
saving_lists = st.lists(savings, min_size=1, max_size=12)


# --- the paper's worked examples --------------------------------------------------------------


def test_paper_eq_4_2_two_modules() -> None:
    assert compound_independent([0.10, 0.15]) == pytest.approx(0.235, abs=1e-15)


def test_paper_eq_4_3_weighted() -> None:
    assert compound_weighted([0.10, 0.15], [0.6, 0.4]) == pytest.approx(0.12, abs=1e-15)


def test_paper_growth_table() -> None:
    assert compound_growth([0.01] * 3) == pytest.approx(0.030301, abs=1e-15)
    assert compound_growth([0.01] * 9) == pytest.approx(1.01**9 - 1, abs=1e-15)
    assert round(compound_growth([0.01] * 9) * 100, 4) == 9.3685


def test_paper_examples_flag_only_the_nine_module_slip() -> None:
    by_name = {example.name: example for example in PAPER_EXAMPLES}
    assert [e.name for e in PAPER_EXAMPLES if not e.agrees] == ["sec 3: nine +1% modules"]
    slip = by_name["sec 3: nine +1% modules"]
    assert slip.paper_printed == pytest.approx(0.0927)
    assert round(slip.computed * 100, 2) == 9.37
    assert by_name["eq 4.2: two modules"].computed == pytest.approx(0.235)
    assert by_name["eq 4.3: weighted modules"].computed == pytest.approx(0.12)
    assert by_name["sec 3: three -1% (power) modules"].computed == pytest.approx(-0.0294, abs=5e-5)


# --- eq 4.2 ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, 1.5, math.inf, math.nan])
def test_independent_rejects_impossible_savings(bad: float) -> None:
    with pytest.raises(CompoundError, match="delta"):
        compound_independent([0.1, bad])


def test_independent_handles_regressions_and_nothing() -> None:
    assert compound_independent([-0.10, 0.10]) == pytest.approx(1 - 1.1 * 0.9)
    assert compound_independent([]) == 0.0


@given(saving_lists, st.randoms(use_true_random=False))
def test_independent_is_order_independent(deltas: list[float], rng) -> None:
    shuffled = list(deltas)
    rng.shuffle(shuffled)
    assert compound_independent(shuffled) == compound_independent(deltas)


@given(saving_lists)
def test_independent_lies_between_largest_single_and_one(deltas: list[float]) -> None:
    total = compound_independent(deltas)
    assert max(deltas) - 1e-12 <= total < 1.0


@given(st.lists(st.floats(min_value=-0.5, max_value=0.9), min_size=1, max_size=12))
def test_independent_matches_the_plain_product(deltas: list[float]) -> None:
    assert compound_independent(deltas) == pytest.approx(
        1 - np.prod(1 - np.array(deltas)), rel=1e-9, abs=1e-12
    )


# --- eq 4.3 and the hierarchical form ---------------------------------------------------------


def test_weighted_rejects_weights_not_summing_to_one() -> None:
    with pytest.raises(CompoundError, match="sum to 0.9") as error:
        compound_weighted([0.1, 0.2], [0.5, 0.4])
    assert "\n" not in str(error.value)


def test_weighted_accepts_round_off_but_not_more() -> None:
    assert compound_weighted([0.1, 0.2], [0.5, 0.5 + 5e-7]) == pytest.approx(0.15, abs=1e-6)
    with pytest.raises(CompoundError, match="sum to 1"):
        compound_weighted([0.1, 0.2], [0.5, 0.5 + 2e-6])


@pytest.mark.parametrize(
    ("deltas", "weights", "message"),
    [([0.1, 0.2], [1.2, -0.2], "non-negative"), ([0.1, 0.2], [1.0], "1 weights for 2")],
)
def test_weighted_rejects_bad_weights(deltas, weights, message: str) -> None:
    with pytest.raises(CompoundError, match=message):
        compound_weighted(deltas, weights)


@given(saving_lists)
def test_hierarchical_reduces_to_eq_4_2_for_system_wide_savings(deltas: list[float]) -> None:
    total = compound_hierarchical({"system": 1.0}, {"system": deltas})
    assert total == pytest.approx(compound_independent(deltas), rel=1e-12, abs=1e-15)


@given(
    st.lists(st.tuples(savings, st.floats(min_value=0.01, max_value=1.0)), min_size=1, max_size=8)
)
def test_hierarchical_reduces_to_eq_4_3_with_one_transform_per_module(pairs) -> None:
    deltas = [d for d, _ in pairs]
    raw = np.array([w for _, w in pairs])
    weights = list(raw / raw.sum())
    names = [f"m{i}" for i in range(len(pairs))]
    total = compound_hierarchical(
        dict(zip(names, weights, strict=True)), {n: [d] for n, d in zip(names, deltas, strict=True)}
    )
    assert total == pytest.approx(compound_weighted(deltas, weights), rel=1e-12, abs=1e-15)


def test_hierarchical_amdahl_known_answers() -> None:
    # Untouched modules keep their cost; stacked transforms compound inside their module.
    assert compound_hierarchical({"a": 0.5, "b": 0.5}, {"a": [0.2]}) == pytest.approx(0.10)
    shares = {"vision": 0.6, "text": 0.4}
    assert compound_hierarchical(shares, {"vision": [0.1, 0.1]}) == pytest.approx(0.6 * 0.19)
    # Sleeping the vision encoder removes its whole share: a local saving of exactly 100%.
    assert compound_hierarchical({"vision": 0.3, "lm": 0.7}, {"vision": [1.0]}) == 0.3


def test_hierarchical_rejects_unknown_modules_and_bad_shares() -> None:
    with pytest.raises(CompoundError, match="no share: ghost"):
        compound_hierarchical({"a": 1.0}, {"ghost": [0.1]})
    with pytest.raises(CompoundError, match="sum to 0.8"):
        compound_hierarchical({"a": 0.5, "b": 0.3}, {})


# --- declared modules -------------------------------------------------------------------------


def test_compound_modules_names_declared_inputs() -> None:
    result = compound_modules(
        [
            ModuleSaving("attention", 0.10, 0.6),
            ModuleSaving("hbm", 0.15, 0.4, source="declared"),
        ]
    )
    assert result.independent == pytest.approx(0.235)
    assert result.weighted == pytest.approx(0.12)
    assert result.declared_inputs == ("hbm",)
    assert result.to_dict()["declared_inputs"] == ("hbm",)


def test_compound_modules_weighted_only_with_every_weight() -> None:
    unweighted = compound_modules(
        [ModuleSaving("a", 0.1), ModuleSaving("b", 0.2, None, "estimated")]
    )
    assert unweighted.weighted is None
    assert unweighted.estimated_inputs == ("b",)
    with pytest.raises(CompoundError, match="missing: b"):
        compound_modules([ModuleSaving("a", 0.1, 1.0), ModuleSaving("b", 0.2)])


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ([ModuleSaving("a", 0.1), ModuleSaving("a", 0.2)], "repeated: a"),
        ([ModuleSaving("a", 1.0)], "100% or more"),
        ([], "no module"),
    ],
)
def test_compound_modules_rejects_bad_lists(modules, message: str) -> None:
    with pytest.raises(CompoundError, match=message):
        compound_modules(modules)


def test_module_saving_rejects_unknown_source() -> None:
    with pytest.raises(CompoundError, match="unknown source"):
        ModuleSaving("a", 0.1, source="guessed")  # type: ignore[arg-type]


# --- modules needed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("saving", "target", "reading", "expected"),
    [
        (0.01, 0.50, "resource-saving", 69),
        (0.01, 0.50, "speed-up", 41),
        (0.01, 0.50, "growth", 41),
        (0.01, 0.20, "resource-saving", 23),
        # Exact boundaries whose log ratio lands a hair above the integer in floats:
        (0.25, 0.578125, "resource-saving", 3),  # 1 - 0.75**3, exact in binary
        (0.30, 0.51, "resource-saving", 2),
        (0.20, 1.0736, "growth", 4),
        (0.10, 0.19, "resource-saving", 2),  # direct 1 - 0.9**2 evaluates just below 0.19
        (0.50, 3.00, "speed-up", 2),
    ],
)
def test_modules_needed_known_answers(saving, target, reading, expected: int) -> None:
    assert modules_needed(saving, target, reading) == expected


def reading_value(s: float, n: int, reading: str) -> float:
    """What n equal, independent modules of saving s give under one reading, by brute force."""
    if reading == "resource-saving":
        return 1 - (1 - s) ** n
    if reading == "speed-up":
        return (1 - s) ** -n - 1
    return (1 + s) ** n - 1


@given(
    st.floats(min_value=1e-3, max_value=0.5),
    st.floats(min_value=1e-3, max_value=0.95),
    st.sampled_from(sorted(READINGS)),
)
def test_modules_needed_is_the_smallest_sufficient_count(saving, target, reading) -> None:
    n = modules_needed(saving, target, reading)
    assert n is not None and n >= 1
    assert reading_value(saving, n, reading) >= target * (1 - 1e-9)
    assert reading_value(saving, n - 1, reading) < target * (1 + 1e-9)


def test_modules_needed_unreachable_and_invalid() -> None:
    assert modules_needed(0.0, 0.5, "growth") is None
    assert modules_needed(-0.01, 0.5, "speed-up") is None
    assert modules_needed(0.01, 1.0, "resource-saving") is None
    with pytest.raises(CompoundError, match="unknown reading"):
        modules_needed(0.01, 0.5, "vibes")  # type: ignore[arg-type]
    with pytest.raises(CompoundError, match="< 100%"):
        modules_needed(1.0, 0.5, "speed-up")
    with pytest.raises(CompoundError, match="target must be > 0"):
        modules_needed(0.01, 0.0, "growth")


# --- the vectorised eq 4.2 the verdict bootstraps ------------------------------------------


def test_independent_saving_is_eq_4_2_down_axis_0() -> None:
    resamples = np.array([[0.10, 0.20, -0.05], [0.15, 0.0, 1.0]])
    expected = [1 - 0.9 * 0.85, 0.20, 1.0]
    assert independent_saving(resamples) == pytest.approx(expected, abs=1e-12)
    assert float(independent_saving([0.10, 0.15])) == compound_independent([0.10, 0.15])


# --- the CLI ----------------------------------------------------------------------------------


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["formula", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_independent_prints_the_paper_total(capsys) -> None:
    code, out, _ = _run(capsys, "--delta", "0.10", "--delta", "15%")
    assert code == 0
    assert "eq 4.2  independent  Δ_total = 23.5%" in out
    assert "eq 4.3" not in out


def test_cli_weighted_and_declared_marks_every_line(capsys) -> None:
    code, out, _ = _run(
        capsys, "--delta", "10%", "--declared", "hbm=15%", "--weight", "0.6", "--weight", "0.4"
    )
    assert code == 0
    assert "Δ_total = 12%" in out
    for line in out.splitlines():
        if "hbm" in line or "Δ_total" in line:
            assert "declared" in line, line


def test_cli_modules_needed_defaults(capsys) -> None:
    code, out, _ = _run(capsys, "--per-module", "1%")
    assert code == 0
    assert "target 50% (efficiency gain" in out
    assert "resource-saving 69  speed-up 41  growth 41" in out
    assert "target 20% (cost cut" in out and "resource-saving 23" in out
    assert all(reading in out for reading in READINGS)


def test_cli_paper_flags_the_slip(capsys) -> None:
    code, out, _ = _run(capsys, "--paper")
    assert code == 0
    slip = next(line for line in out.splitlines() if "(1.01)^9" in line)
    assert "+9.27%" in slip and "+9.37%" in slip and "DIFFERS" in slip


def test_cli_json(capsys) -> None:
    code, out, _ = _run(
        capsys,
        "--delta",
        "0.10",
        "--declared",
        "soc=0.15",
        "--per-module",
        "0.01",
        "--target",
        "50%",
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["independent"]["delta_total"] == pytest.approx(0.235)
    assert report["independent"]["declared_inputs"] == ["soc"]
    assert report["weighted"] is None
    assert [(i["name"], i["source"]) for i in report["inputs"]] == [
        ("d1", "measured"),
        ("soc", "declared"),
    ]
    row = report["modules_needed"]["targets"][0]
    assert (row["resource-saving"], row["speed-up"], row["growth"]) == (69, 41, 41)
    assert report["paper_examples"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--delta", "abc"], "bad number 'abc'"),
        (["--delta", "1"], "impossible"),
        (["--delta", "120%"], "impossible"),
        (["--delta", "0.1", "--delta", "0.2", "--weight", "0.5", "--weight", "0.4"], "sum to 0.9"),
        (["--delta", "0.1", "--delta", "0.2", "--weight", "1"], "1 --weight for 2 inputs"),
        ([], "nothing to compute"),
        (["--declared", "hbm"], "NAME=X"),
        (["--target", "50%"], "needs --per-module"),
    ],
)
def test_cli_errors_exit_2_with_one_line(capsys, argv: list[str], message: str) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("compound: error:")
    assert message in err
