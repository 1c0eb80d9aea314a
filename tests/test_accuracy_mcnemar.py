"""Accuracy verdict with exact paired tests (bench.judge.accuracy): known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, stats

from bench.judge.accuracy import (
    ADDITIVE,
    BETTER_THAN_ADDITIVE,
    INCONCLUSIVE,
    WORSE_THAN_ADDITIVE,
    accuracy_verdict,
    mcnemar_p,
    paired_drop,
    rule_of_three,
)


def pair(b: int, c: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline/config correctness with b (base right, config wrong) and c (the reverse)."""
    base = np.zeros(n, dtype=bool)
    config = np.zeros(n, dtype=bool)
    base[:b] = True  # base right, config wrong
    config[b : b + c] = True  # base wrong, config right
    both_right = slice(b + c, b + c + (n - b - c) // 2)
    base[both_right] = config[both_right] = True
    return base, config


def tango_closed_form(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango (1998) from its published closed form for the restricted MLE of the c cell."""
    z = stats.norm.ppf(0.5 + confidence / 2)
    d_hat = (b - c) / n

    def score(d: float) -> float:
        if d == d_hat:
            return 0.0
        a_, b_, c_ = 2 * n, -b - c + (2 * n - b + c) * d, -c * d * (1 - d)
        q = (-b_ + math.sqrt(b_ * b_ - 4 * a_ * c_)) / (2 * a_)
        return (b - c - n * d) / math.sqrt(n * (2 * q + d * (1 - d)))

    lo = optimize.brentq(lambda d: score(d) - z, -1 + 1e-12, d_hat) if d_hat > -1 else -1.0
    hi = optimize.brentq(lambda d: score(d) + z, d_hat, 1 - 1e-12) if d_hat < 1 else 1.0
    return lo, hi


def disjoint(n: int = 2000, stack_extra_wrong: int = 0) -> dict[str, np.ndarray]:
    """Baseline right on 80%; a and b each break 40 disjoint examples; the stack breaks both
    sets plus `stack_extra_wrong` more (negative: it keeps some of b's losses right)."""
    base = np.zeros(n, dtype=bool)
    base[: int(0.8 * n)] = True
    a, b = base.copy(), base.copy()
    a[0:40] = False
    b[40:80] = False
    stack = a & b
    if stack_extra_wrong > 0:
        stack[80 : 80 + stack_extra_wrong] = False
    else:
        stack[40 : 40 - stack_extra_wrong] = True
    return {"base": base, "a": a, "b": b, "stack": stack}


def verdict(data, **kw):
    return accuracy_verdict(data, "base", ["a", "b"], "stack", **kw)


# --- exact McNemar p-values -------------------------------------------------------------


def test_mcnemar_p_by_hand():
    # b=10, c=2: two-sided exact = 2·P(X ≥ 10 | X ~ Bin(12, 1/2)) = 2·(66 + 12 + 1)/4096.
    assert mcnemar_p(10, 2) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_p(10, 2) == pytest.approx(stats.binomtest(10, 12, 0.5).pvalue, rel=1e-12)
    assert mcnemar_p(2, 10) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(6, 0) == pytest.approx(2 / 64, rel=1e-12)


def test_row_counts_drop_and_p_value():
    base, config = pair(10, 2, 200)
    row = paired_drop(base, config, config="q")
    assert (row.config, row.n, row.b, row.c) == ("q", 200, 10, 2)
    assert row.drop.point == pytest.approx(8 / 200)
    assert row.p_value == pytest.approx(158 / 4096, rel=1e-12)
    assert row.drop.lo < 8 / 200 < row.drop.hi
    assert "Tango" in row.method


# --- intervals ----------------------------------------------------------------------------


def test_rule_of_three_when_no_discordant_pairs():
    base, _ = pair(0, 0, 2000)
    row = paired_drop(base, base.copy())
    assert (row.b, row.c, row.p_value) == (0, 0, 1.0)
    assert row.drop == (0.0, -3 / 2000, 3 / 2000)
    assert row.method == "rule of three: no discordant pairs"
    assert rule_of_three(2000) == 3 / 2000
    # above 95% confidence −ln(α) exceeds 3 and is used
    assert rule_of_three(100, 0.99) == pytest.approx(-math.log(0.01) / 100)


@pytest.mark.parametrize("b,c,n", [(10, 2, 100), (1, 0, 50), (0, 3, 40), (7, 3, 2000), (29, 0, 30)])
def test_drop_interval_is_tango(b, c, n):
    row = paired_drop(*pair(b, c, n))
    assert (row.drop.lo, row.drop.hi) == pytest.approx(tango_closed_form(b, c, n), abs=1e-9)


def test_drop_interval_known_values():
    # b=10, c=2, n=100: Tango's interval, computed once from the closed form.
    row = paired_drop(*pair(10, 2, 100))
    assert row.drop.lo == pytest.approx(0.0142965, abs=1e-6)
    assert row.drop.hi == pytest.approx(0.1580402, abs=1e-6)


def test_drop_interval_coverage_on_simulated_pairs():
    """Paired binomial data, true drop 0.025: the 95% interval must cover ≈95% of the time."""
    rng = np.random.default_rng(20240607)
    n, p_b, p_c, sims = 300, 0.04, 0.015, 300
    cells = rng.choice(4, size=(sims, n), p=[0.7, p_b, p_c, 1 - 0.7 - p_b - p_c])
    covered = 0
    for cell in cells:
        base = (cell == 0) | (cell == 1)  # 0: both right, 1: base only, 2: config only
        config = (cell == 0) | (cell == 2)
        row = paired_drop(base, config)
        covered += row.drop.lo <= p_b - p_c <= row.drop.hi
    assert 0.93 <= covered / sims <= 0.985


def test_contrast_with_one_single_is_tango_on_single_vs_stack():
    base, single = pair(0, 0, 500)
    stack = single.copy()
    stack[220:275] = ~stack[220:275]  # 30 right → wrong, 25 wrong → right
    v = accuracy_verdict({"base": base, "s": single, "stack": stack}, "base", ["s"], "stack")
    b, c = 30, 25  # x = single − stack: +1 where the stack alone is wrong, −1 the reverse
    assert v.difference.point == pytest.approx((b - c) / 500)
    assert (v.difference.lo, v.difference.hi) == pytest.approx(
        tango_closed_form(b, c, 500), abs=1e-9
    )


# --- the word -----------------------------------------------------------------------------


def test_disjoint_errors_add_up_exactly_additive():
    v = verdict(disjoint(), margin=0.005)
    assert v.word == ADDITIVE
    assert v.n_examples == 2000
    assert v.stacked_drop.point == pytest.approx(0.04)
    assert v.sum_single_drops.point == pytest.approx(0.04)
    assert v.difference.point == 0.0
    # x = 0 everywhere: rule of three scaled by k = 2 singles
    assert (v.difference.lo, v.difference.hi) == (-6 / 2000, 6 / 2000)
    assert "rule of three" in v.difference_method
    assert v.margin_needed == pytest.approx(0.003)
    assert [r.config for r in v.rows] == ["a", "b", "stack"]
    assert [(r.b, r.c) for r in v.rows] == [(40, 0), (40, 0), (80, 0)]


def test_contains_zero_is_not_enough_for_additive():
    """Same exact additivity, but the margin is tighter than the data can resolve."""
    v = verdict(disjoint(), margin=0.002)
    assert v.difference.contains(0.0)
    assert v.word == INCONCLUSIVE
    assert v.margin_needed == pytest.approx(0.003)
    assert "0.30 pp" in v.note


def test_tiny_n_is_inconclusive():
    data = {
        "base": [1, 1, 1, 1, 1, 0, 1, 1, 1, 1],
        "a": [0, 1, 1, 1, 1, 0, 1, 1, 1, 1],
        "b": [1, 0, 1, 1, 1, 0, 1, 1, 1, 1],
        "stack": [0, 0, 1, 1, 1, 0, 1, 1, 1, 1],
    }
    v = verdict(data)
    assert v.difference.point == 0.0
    assert v.word == INCONCLUSIVE
    assert v.margin_needed > 0.5  # ±3·2/10
    assert "inconclusive" in v.note


def test_interaction_planted_in_stack_is_worse_than_additive():
    v = verdict(disjoint(stack_extra_wrong=60))
    assert v.word == WORSE_THAN_ADDITIVE
    assert v.difference.point == pytest.approx(0.03)
    assert v.difference.lo > 0
    assert v.row("stack").b == 140
    assert v.row("stack").p_value < 1e-30


def test_stack_keeping_losses_right_is_better_than_additive():
    v = verdict(disjoint(stack_extra_wrong=-30))
    assert v.word == BETTER_THAN_ADDITIVE
    assert v.difference.point == pytest.approx(-0.015)
    assert v.difference.hi < 0


def test_small_departure_within_margin_is_additive():
    """TOST: an interval above 0 but inside ±margin is practically additive."""
    v = verdict(disjoint(stack_extra_wrong=8), margin=0.02)
    assert v.difference.lo > 0
    assert v.difference.hi < 0.02
    assert v.word == ADDITIVE
    assert "excludes 0" in v.note
    assert verdict(disjoint(stack_extra_wrong=8), margin=0.005).word == WORSE_THAN_ADDITIVE


def test_no_change_anywhere_note():
    same = np.r_[np.ones(1800, dtype=bool), np.zeros(200, dtype=bool)]
    v = verdict({"base": same, "a": same, "b": same, "stack": same})
    assert v.word == ADDITIVE
    assert all(r.drop == (0.0, -0.0015, 0.0015) for r in v.rows)
    assert "no example changed answer under any transform" in v.note
    assert "±0.15 pp (rule of three, n=2000)" in v.note


def test_contrast_coverage_two_singles():
    """Random patterns with a planted interaction; the contrast interval must cover D."""
    rng = np.random.default_rng(7)
    n, sims = 400, 120
    base = rng.random((sims, n)) < 0.8
    a = base & (rng.random((sims, n)) > 0.03)
    b = base & (rng.random((sims, n)) > 0.02)
    stack = a & b & (rng.random((sims, n)) > 0.01)
    # true D: x = (base − stack) − (base − a) − (base − b) per example; derive its mean exactly
    p_both_break = 0.8 * 0.03 * 0.02
    p_extra = 0.8 * 0.97 * 0.98 * 0.01
    true_d = p_extra - p_both_break
    covered = 0
    for i in range(sims):
        v = verdict({"base": base[i], "a": a[i], "b": b[i], "stack": stack[i]})
        covered += v.difference.lo <= true_d <= v.difference.hi
    assert covered / sims >= 0.93


# --- input handling -----------------------------------------------------------------------


def test_unscored_examples_dropped_from_every_comparison():
    data = {k: v.astype(float) for k, v in disjoint().items()}
    data["a"][0] = np.nan  # an 'a' loss, now unscored
    data["stack"][1999] = np.nan
    v = verdict(data)
    assert (v.n_examples, v.n_dropped) == (1998, 2)
    assert all(r.n == 1998 for r in v.rows)
    assert [(r.b, r.c) for r in v.rows] == [(39, 0), (40, 0), (79, 0)]
    assert v.difference.point == 0.0


def test_to_dict_is_json_safe_with_named_bounds():
    out = verdict(disjoint(stack_extra_wrong=60)).to_dict()
    text = json.dumps(out, allow_nan=False)
    assert set(out["difference"]) == {"point", "lo", "hi"}
    assert set(out["stacked_drop"]) == {"point", "lo", "hi"}
    assert out["rows"][2]["config"] == "stack"
    assert set(out["rows"][2]["drop"]) == {"point", "lo", "hi"}
    for key in ("word", "margin", "margin_needed", "n_examples", "note", "difference_method"):
        assert key in out
    assert json.loads(text)["word"] == WORSE_THAN_ADDITIVE


@pytest.mark.parametrize(
    "data,kw,message",
    [
        ({"base": [1, 0], "a": [1, 0, 1], "b": [1, 0], "stack": [1, 0]}, {}, "equal lengths"),
        ({"base": [1, 0], "a": [1, 0], "stack": [1, 0]}, {}, r"\['b'\]"),
        ({"base": [1, 0], "a": [1, 2], "b": [1, 0], "stack": [1, 0]}, {}, "0/1"),
        ({"base": [1, 0], "a": ["x", 1], "b": [1, 0], "stack": [1, 0]}, {}, "numeric"),
        ({"base": [[1, 0]], "a": [[1, 0]], "b": [[1, 0]], "stack": [[1, 0]]}, {}, "1-D"),
        (
            {"base": [np.nan, 1], "a": [1, np.nan], "b": [1, 0], "stack": [1, 0]},
            {},
            "no example is scored",
        ),
        ({"base": [1], "a": [1], "b": [1], "stack": [1]}, {"margin": 0}, "margin"),
        ({"base": [1], "a": [1], "b": [1], "stack": [1]}, {"confidence": 1.0}, "confidence"),
    ],
)
def test_bad_input_is_refused(data, kw, message):
    with pytest.raises(ValueError, match=message):
        verdict(data, **kw)


def test_bad_names_are_refused():
    data = {"base": [1, 0], "a": [1, 0], "stack": [1, 0]}
    with pytest.raises(ValueError, match="at least one single"):
        accuracy_verdict(data, "base", [], "stack")
    with pytest.raises(ValueError, match="distinct"):
        accuracy_verdict(data, "base", ["a", "a"], "stack")
    with pytest.raises(ValueError, match="sequence of configuration names"):
        accuracy_verdict(data, "base", "a", "stack")
    with pytest.raises(ValueError, match="equal lengths"):
        paired_drop([1, 0, 1], [1, 0])
