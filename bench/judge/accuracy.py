"""Accuracy verdict with exact paired tests: do the single transforms' accuracy drops add up?

Every configuration (the baseline, each single transform and the stack of all of them) is
scored on the same held-out examples, so configurations are compared example by example.
Correctness is 0/1, and an accuracy drop is driven only by the few examples that change
answer; a bootstrap over examples then says little (it has zero width when nothing changed,
and undercovers when little did). This module uses exact and score-based paired methods:

* Per configuration vs the baseline: the discordant counts b (baseline right, config wrong)
  and c (baseline wrong, config right), the exact McNemar p-value (two-sided binomial test of
  b in b + c at 1/2; McNemar 1947), and the drop (b − c)/n with Tango's score interval for a
  difference of paired proportions (Tango 1998). When b + c = 0 the interval is the rule of
  three: the drop lies within ±3/n (Hanley & Lippman-Hand 1983).
* The additivity contrast: per example x_i = (base_i − stack_i) − Σ_s (base_i − single_s,i),
  D = mean(x) = stacked drop − Σ single drops. x takes integer values in [−k, k] (k singles),
  and its interval is the score interval for the mean of a multinomial on {−k, …, k}: Tango's
  interval is the case k = 1, and this is its direct generalisation (the same restricted
  maximum likelihood under the hypothesised mean, the same score statistic). When x = 0 on
  every example the interval is the rule of three scaled by k: D lies within ±3k/n.
* The word is an equivalence judgement (TOST), never "the interval contains 0": `additive`
  only when the whole interval lies within ±margin.

References:
    McNemar Q (1947) Psychometrika 12:153–157.
    Tango T (1998) Equivalence test and confidence interval for the difference in
        proportions for the paired-sample design. Stat Med 17:891–908 (and correction,
        Stat Med 18:3511, 1999).
    Fagerland MW, Lydersen S, Laake P (2014) Recommended tests and confidence intervals for
        paired binomial proportions. Stat Med 33:2850–2875 (recommends Tango's interval).
    Hanley JA, Lippman-Hand A (1983) If nothing goes wrong, is everything all right?
        JAMA 249:1743–1745 (the rule of three).
    Schuirmann DJ (1987) A comparison of the two one-sided tests procedure and the power
        approach for assessing the equivalence of average bioavailability. J Pharmacokinet
        Biopharm 15:657–680 (TOST).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, stats

from core.jsonio import json_safe

ADDITIVE = "additive"
WORSE_THAN_ADDITIVE = "worse-than-additive"
BETTER_THAN_ADDITIVE = "better-than-additive"
INCONCLUSIVE = "inconclusive"
DEFAULT_MARGIN = 0.01

TANGO = "Tango score interval for paired proportions (Tango 1998)"
RULE_OF_THREE_ROW = "rule of three: no discordant pairs"
SCORE_CONTRAST = "multinomial score interval on {-k..k} (Tango 1998, generalised to k singles)"
RULE_OF_THREE_CONTRAST = "rule of three scaled by k: x = 0 on every example"


class Interval(NamedTuple):
    """A point estimate and its confidence interval (accuracy fractions)."""

    point: float
    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def contains(self, value: float) -> bool:
        return bool(self.lo <= value <= self.hi)


@dataclass(frozen=True)
class DropRow:
    """One configuration vs the baseline on the paired examples.

    `b`: baseline right, config wrong; `c`: baseline wrong, config right. `drop` is the
    accuracy drop (b − c)/n as a fraction (positive: the config is less accurate), `p_value`
    the exact McNemar p-value (1 when b + c = 0), `method` how `drop`'s interval was made.
    """

    config: str
    n: int
    b: int
    c: int
    drop: Interval
    p_value: float
    method: str

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self) | {"drop": self.drop._asdict()})


@dataclass(frozen=True)
class PairedAccuracyVerdict:
    """Stacked accuracy drop vs the sum of single drops, paired by example, judged by TOST.

    `rows`: each single then the stack, vs the baseline. `difference` is D = stacked drop −
    Σ single drops (positive: the stack loses more than the singles' losses add up to).
    `margin_needed` = max(|lo|, |hi|) of `difference`: the smallest margin at which the
    verdict would have been `additive`. `n_dropped` counts examples left out because some
    configuration did not score them.
    """

    baseline: str
    stack: str
    rows: tuple[DropRow, ...]
    stacked_drop: Interval
    sum_single_drops: Interval
    difference: Interval
    difference_method: str
    word: str
    margin: float
    margin_needed: float
    confidence: float
    n_examples: int
    n_dropped: int
    note: str

    def row(self, config: str) -> DropRow:
        for r in self.rows:
            if r.config == config:
                return r
        raise KeyError(f"no row for configuration {config!r}; have {[r.config for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        intervals = ("stacked_drop", "sum_single_drops", "difference")
        return json_safe(
            asdict(self)
            | {f: getattr(self, f)._asdict() for f in intervals}
            | {"rows": [r.to_dict() for r in self.rows]}
        )


def rule_of_three(n: int, confidence: float = 0.95) -> float:
    """Upper confidence bound on a rate after 0 events in n trials: 3/n at 95%.

    The exact (Clopper-Pearson, one-sided) bound is 1 − α^(1/n) ≤ −ln(α)/n, and −ln(0.05) ≈
    2.996 ≤ 3. Above 95% confidence −ln(α) exceeds 3 and is used instead; below it 3 is kept
    (conservative).
    """
    return max(3.0, -math.log1p(-confidence)) / n


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: binomial test of b in b + c at 1/2; 1 when b + c = 0."""
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def paired_drop(
    base_correct: ArrayLike,
    config_correct: ArrayLike,
    confidence: float = 0.95,
    config: str = "config",
) -> DropRow:
    """Accuracy drop of one configuration vs the baseline on paired examples.

    Examples unscored (NaN) in either are dropped. The interval is Tango's score interval for
    the difference of paired proportions (Tango 1998): the set of Δ whose score statistic
    (b − c − nΔ) / sqrt(n (2q̂ + Δ(1 − Δ))), q̂ the restricted MLE of P(c-cell) under Δ, lies
    within ±z. It depends on b, c and n only, and has near-nominal coverage down to small b + c
    (Fagerland et al. 2014). The conditional interval (Clopper-Pearson on b/(b+c)) was not
    used: it treats b + c as fixed and so ignores the uncertainty in how many examples change.
    When b + c = 0 the drop lies within ±3/n: |drop| is at most the discordance rate, and the
    rule of three bounds that after 0 discordant pairs in n.
    """
    _check_confidence(confidence)
    data = _paired_correctness({"base": base_correct, config: config_correct}, ["base", config])
    keep = _scored_in_all(data)
    if not keep.any():
        raise ValueError(f"{config}: no example is scored in both the baseline and the config")
    return _drop_row(config, data["base"][keep], data[config][keep], confidence)


def accuracy_verdict(
    correct: Mapping[str, ArrayLike],
    baseline: str,
    singles: Sequence[str],
    stack: str,
    margin: float = DEFAULT_MARGIN,
    confidence: float = 0.95,
) -> PairedAccuracyVerdict:
    """Judge whether accuracy drops add up: stacked drop vs Σ single drops, paired by example.

    `correct` maps configuration → per-example correctness (bool or 0/1; NaN where unscored),
    on the same examples in the same order; examples unscored in any of baseline, singles or
    stack are dropped from every comparison, so the rows and the contrast share one n.
    `margin` is the equivalence margin for D in accuracy-fraction units (0.01 = 1 pp).

    The contrast D = mean(x), x_i = (base_i − stack_i) − Σ_s (base_i − single_s,i):

    * If x_i = 0 on every example: let π = P(x ≠ 0) on an unseen example. 0 of n observed
      gives π ≤ 3/n at 95% (rule of three). Given base_i, each term of x_i has one sign, so
      x_i ∈ [−k, 1] when the baseline is right and [−1, k] when it is wrong: |x| ≤ k (k ≥ 1
      singles). Hence |D| = |E x| ≤ E|x| ≤ k·π ≤ 3k/n. This is conservative: it lets every
      example that could change do so by the largest amount, all in one direction.
    * Otherwise: the score interval for the mean of x as a multinomial on {−k, …, k} — the set
      of μ with |x̄ − μ| ≤ z·sqrt(Var_μ(x)/n), Var_μ the variance under the maximum likelihood
      cell probabilities constrained to mean μ. For k = 1 this is exactly Tango's interval (the
      cells are +1, 0, −1), and like Wilson's and Tango's intervals it stays inside [−k, k],
      is not zero-width, and is not centred on x̄ when few examples are non-zero.

    Word (TOST with the two-sided `confidence` interval, i.e. each one-sided test at level
    (1 − confidence)/2): `additive` when the interval lies within ±margin; otherwise
    `worse-than-additive` when it lies above 0 (the stack loses more than the sum),
    `better-than-additive` when it lies below 0; otherwise `inconclusive`.
    """
    _check_confidence(confidence)
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a finite number > 0 (accuracy fraction), got {margin}")
    names = _check_names(correct, baseline, singles, stack)
    data = _paired_correctness(correct, names)
    keep = _scored_in_all(data)
    n = int(keep.sum())
    if n == 0:
        raise ValueError(f"no example is scored in every configuration of {names}")
    data = {name: v[keep] for name, v in data.items()}
    base = data[baseline]
    rows = tuple(_drop_row(s, base, data[s], confidence) for s in [*singles, stack])

    k = len(singles)
    single_drops = np.sum([base - data[s] for s in singles], axis=0)
    x = (base - data[stack]) - single_drops
    sum_single, _ = _mean_interval(single_drops, k, confidence)
    difference, method = _mean_interval(x, k, confidence)
    margin_needed = max(abs(difference.lo), abs(difference.hi))
    word = _judge(difference, margin)
    return PairedAccuracyVerdict(
        baseline=baseline,
        stack=stack,
        rows=rows,
        stacked_drop=rows[-1].drop,
        sum_single_drops=sum_single,
        difference=difference,
        difference_method=method,
        word=word,
        margin=float(margin),
        margin_needed=float(margin_needed),
        confidence=float(confidence),
        n_examples=n,
        n_dropped=int(keep.size - n),
        note=_note(rows, difference, method, word, margin, margin_needed, n, confidence),
    )


def _judge(d: Interval, margin: float) -> str:
    if -margin < d.lo and d.hi < margin:
        return ADDITIVE
    if d.lo > 0:
        return WORSE_THAN_ADDITIVE
    if d.hi < 0:
        return BETTER_THAN_ADDITIVE
    return INCONCLUSIVE


def _pp(value: float) -> str:
    return f"{100 * value:+.2f} pp"


def _note(
    rows: Sequence[DropRow],
    d: Interval,
    method: str,
    word: str,
    margin: float,
    needed: float,
    n: int,
    confidence: float,
) -> str:
    """Say in words what the numbers allow, including when they cannot tell."""
    level = f"{100 * confidence:g}%"
    ci = f"D = {_pp(d.point)}, {level} CI [{_pp(d.lo)}, {_pp(d.hi)}]"
    notes = []
    if all(r.b + r.c == 0 for r in rows):
        bound = 100 * min(rule_of_three(n, confidence), 1.0)
        notes.append(
            f"no example changed answer under any transform: drops are 0 within "
            f"±{bound:.2f} pp (rule of three, n={n})"
        )
    else:
        unchanged = [r.config for r in rows if r.b + r.c == 0]
        if unchanged:
            notes.append(f"no example changed answer under {unchanged} (rule-of-three interval)")
        if method == RULE_OF_THREE_CONTRAST:
            notes.append(
                "the changed examples add up exactly on every example (x = 0), so D is bounded "
                f"by the rule of three scaled by the number of singles (n={n})"
            )
    if word == ADDITIVE:
        tail = ""
        if d.lo > 0 or d.hi < 0:
            tail = " (it excludes 0, but the departure is smaller than the margin)"
        notes.append(f"additive: {ci} lies within ±{100 * margin:.2f} pp{tail}")
    elif word == WORSE_THAN_ADDITIVE:
        notes.append(f"the stack loses more accuracy than the singles' drops add up to: {ci}")
    elif word == BETTER_THAN_ADDITIVE:
        notes.append(f"the stack loses less accuracy than the singles' drops add up to: {ci}")
    else:
        notes.append(
            f"inconclusive: {ci} neither lies within ±{100 * margin:.2f} pp nor excludes 0; "
            f"'additive' would need a margin of {100 * needed:.2f} pp (or more examples)"
        )
    return "; ".join(notes)


def _drop_row(name: str, base: np.ndarray, config: np.ndarray, confidence: float) -> DropRow:
    diff = base - config
    b, c, n = int(np.sum(diff > 0)), int(np.sum(diff < 0)), int(diff.size)
    drop, _ = _mean_interval(diff, 1, confidence)
    method = RULE_OF_THREE_ROW if b + c == 0 else TANGO
    return DropRow(name, n, b, c, drop, mcnemar_p(b, c), method)


def _mean_interval(x: np.ndarray, k: int, confidence: float) -> tuple[Interval, str]:
    """Interval for E[x], x integer in [−k, k]: rule of three ×k if all zero, else score."""
    x = np.rint(x).astype(int)
    n = x.size
    if not np.any(x):
        bound = min(k * rule_of_three(n, confidence), float(k))  # |E x| ≤ k regardless
        return Interval(0.0, -bound, bound), RULE_OF_THREE_CONTRAST
    lo, hi = _score_interval(x, k, confidence)
    return Interval(float(x.mean()), lo, hi), SCORE_CONTRAST


def _score_interval(x: np.ndarray, k: int, confidence: float) -> tuple[float, float]:
    """Score interval for the mean of x, a multinomial on the integers {−k, …, k}.

    {μ : |x̄ − μ| ≤ z·sqrt(V(μ)/n)}, V(μ) the variance of x under the restricted MLE of the
    cell probabilities given mean μ. Each bound is found by root-finding between x̄ (where the
    statistic is 0) and the edge of the support (where it diverges).
    """
    n = x.size
    counts = np.bincount(x + k, minlength=2 * k + 1).astype(float)
    values = np.arange(-k, k + 1, dtype=float)
    mean = float(x.mean())
    z = float(stats.norm.ppf(0.5 + confidence / 2))

    def stat(mu: float) -> float:
        if mu == mean:
            return 0.0
        var = _restricted_variance(counts, values, n, mean, mu)
        if var <= 0:
            return math.copysign(math.inf, mean - mu)
        return (mean - mu) / math.sqrt(var / n)

    edge = 1e-12 * k
    lo = -float(k)
    if mean > -k + edge:
        lo = optimize.brentq(lambda mu: stat(mu) - z, -k + edge, mean, xtol=1e-12)
    hi = float(k)
    if mean < k - edge:
        hi = optimize.brentq(lambda mu: stat(mu) + z, mean, k - edge, xtol=1e-12)
    return float(lo), float(hi)


def _restricted_variance(
    counts: np.ndarray, values: np.ndarray, n: int, mean: float, mu: float
) -> float:
    """Var(x) under the MLE of the cell probabilities on `values` subject to E[x] = mu.

    Lagrange/KKT: observed cells get p_v = n_v / (n (1 + λ(v − μ))), with λ solving
    Σ n_v (v − μ)/(1 + λ(v − μ)) = 0 and 1 + λ(v − μ) ≥ 0 on every cell. If no such λ exists
    inside that range, the remaining mass sits on the unobserved end cell (v = ±k) where
    1 + λ(v − μ) = 0 — the cheapest way, in likelihood, to move the mean that far.
    """
    d = values - mu
    if mu == mean:
        return float(np.sum(counts * d * d) / n)
    obs = counts > 0
    n_obs, d_obs = counts[obs], d[obs]
    up = mu > mean
    end = -1 if up else 0
    lam_end = -1.0 / d[end]  # where the end cell's weight 1 + λ d reaches 0

    def h(lam: float) -> float:
        return float(np.sum(n_obs * d_obs / (1.0 + lam * d_obs)))

    if counts[end] == 0:
        h_end = h(lam_end)
        if (up and h_end <= 0) or (not up and h_end >= 0):
            p = np.zeros_like(counts)
            p[obs] = n_obs / (n * (1.0 + lam_end * d_obs))
            p[end] = max(0.0, 1.0 - p.sum())
            return float(np.sum(p * d * d))
        bracket = (lam_end, 0.0) if up else (0.0, lam_end)
    else:
        near = lam_end * (1.0 - 1e-13)
        bracket = (near, 0.0) if up else (0.0, near)
    lam = optimize.brentq(h, *bracket, xtol=1e-300, rtol=1e-15)
    p = counts / (n * (1.0 + lam * d))
    return float(np.sum(p * d * d) / np.sum(p))


def _check_confidence(confidence: float) -> None:
    if not (0 < confidence < 1):
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _check_names(
    data: Mapping[str, Any], baseline: str, singles: Sequence[str], stack: str
) -> list[str]:
    if isinstance(singles, str):
        raise ValueError(f"singles must be a sequence of configuration names, not {singles!r}")
    names = [baseline, *singles, stack]
    if not singles:
        raise ValueError("a verdict needs at least one single transform")
    if len(set(names)) != len(names):
        raise ValueError(f"baseline, singles and stack must be distinct configurations: {names}")
    missing = [n for n in names if n not in data]
    if missing:
        raise ValueError(f"no correctness for configuration(s) {missing}; have {sorted(data)}")
    return names


def _paired_correctness(correct: Mapping[str, ArrayLike], names: Sequence[str]) -> dict:
    """Per-example correctness as 1-D float arrays (1/0, NaN unscored), checked for pairing."""
    data: dict[str, np.ndarray] = {}
    for name in names:
        try:
            v = np.asarray(correct[name], dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: correctness must be numeric 0/1 (or NaN): {exc}") from exc
        if v.ndim != 1:
            raise ValueError(
                f"{name}: correctness must be 1-D (one value per example), got {v.shape}"
            )
        scored = v[~np.isnan(v)]
        bad = scored[(scored != 0) & (scored != 1)]
        if bad.size:
            raise ValueError(
                f"{name}: correctness must be 0/1, True/False or NaN; got {np.unique(bad)[:5]}"
            )
        data[name] = v
    lengths = {name: v.size for name, v in data.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"configurations must be scored on the same examples (equal lengths), got {lengths}"
        )
    return data


def _scored_in_all(data: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.logical_and.reduce([~np.isnan(v) for v in data.values()])
