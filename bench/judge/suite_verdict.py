"""The suite's verdict, from stored samples: do the transforms' savings compound?

- Latency (and GPU energy, when measured): the stack's saving against eq 4.2 from the singles,
  the hierarchical prediction from every module's time (`bench.judge.verdict`), one word each.
- Estimated CPU energy and derived cost are shown, labelled, without a word: they are latency
  times a constant, so a word would repeat latency's.
- Peak memory: bytes freed against the singles' sum, per process (`bench.judge.memory`).
- Accuracy: exact paired tests on the scored examples (`bench.judge.accuracy`).
- Leave-one-out and pair rows, with intervals for their differences; the rows are one
  correlated family, with Holm-adjusted p-values beside them.
- The variance components of the run's latency (round effect, process offset, block noise,
  tail weight) and the resolution they give: the MDE of one transform and of the interaction.

Only configurations that were measured count: a transform whose single was skipped, rejected
or failed is left out, and the verdict is over the stack of the others when that stack exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from bench.configuration import Protocol
from bench.designs import AA_CONTROL, BASELINE, config_name
from bench.judge.accuracy import accuracy_verdict
from bench.judge.analysis import epochs_of, paired_saving, process_table, rounds_of, timed
from bench.judge.components import Components, variance_components
from bench.judge.memory import memory_verdict
from bench.judge.planning import contrast_weight, resolution
from bench.judge.replicated import (
    CONFIDENCE,
    Estimate,
    Rounds,
    estimate,
    locations,
    saving_from_log,
)
from bench.judge.shares import OTHER
from bench.judge.verdict import metric_verdict

TIME_METRIC = ("latency", "latency_mean_s")
RESTATED = ("energy_j", "cost_usd_per_1k")
PEAK_METRICS = ("peak_allocated_bytes", "peak_rss_bytes")
LABELS = {"energy_j": "energy", "cost_usd_per_1k": "cost"}


@dataclass
class SuiteVerdict:
    transforms: list[str]  # those the verdict covers, in stacking order
    stack: str | None
    excluded: dict[str, str] = field(default_factory=dict)  # transform → why it is left out
    metrics: list[dict[str, Any]] = field(default_factory=list)
    restated: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    leave_one_out: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    family: dict[str, Any] | None = None
    components: dict[str, Any] | None = None  # latency's variance components
    resolution: dict[str, Any] | None = None  # what this run could resolve, from them
    sequential: dict[str, Any] | None = None  # the stopping rule's looks (`bench.suite`)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _measured_configs(samples: pd.DataFrame) -> set[str]:
    return set(timed(samples).query("metric == 'block_seconds'")["config"])


def _source(samples: pd.DataFrame, metric: str) -> str:
    return "/".join(sorted(set(timed(samples).query("metric == @metric")["source"]))) or "-"


def _unit(samples: pd.DataFrame, metric: str) -> str:
    return str(timed(samples).query("metric == @metric")["unit"].iloc[0])


def module_rounds(samples: pd.DataFrame) -> Rounds:
    """Per hooked pass, each configuration's seconds in every module and in "other" (the rest
    of the pass): columns are "config|module"."""
    rows = timed(samples)
    modules = rows[rows["metric"] == "module_time_s"]
    totals = rows[rows["metric"] == "hooked_block_seconds"]
    if modules.empty or totals.empty:
        return Rounds(pd.DataFrame(), pd.Series(dtype=int))
    per = modules.pivot_table(index="block", columns=["config", "module"], values="value")
    total = totals.pivot_table(index="block", columns="config", values="value")
    every_module = sorted(set(modules["module"]))
    columns: dict[tuple[str, str], pd.Series] = {}
    for config in total.columns:
        if config not in per.columns.get_level_values(0):
            continue
        # A module this configuration's model lacks (a distilled student's missing layers)
        # took no time in its hooked passes: 0, not a gap.
        hooked = total[config].notna()
        for module in every_module:
            column = per.get((config, module), pd.Series(np.nan, index=per.index))
            columns[(config, module)] = column.where(~hooked, column.fillna(0.0))
        spent = sum(columns[(config, module)] for module in every_module)
        columns[(config, OTHER)] = total[config] - spent
    per = pd.DataFrame(columns, index=per.index)
    per.columns = [f"{c}|{m}" for c, m in per.columns]
    return Rounds(per, epochs_of(samples).reindex(per.index))


def hierarchical_prediction(samples: pd.DataFrame, singles: Sequence[str]) -> Estimate | None:
    """Δ = 1 − Σ_m w_m·Π_t(1 − Δ_t,m) over every module and "other": w_m the baseline's share,
    Δ_t,m each single's saving on module m, targeted or not (a wake reload or a scoring pass
    lands in modules the transform does not name). Interval from the same process resampling.
    """
    rounds = module_rounds(samples)
    if rounds.table.empty:
        return None
    modules = sorted({c.split("|", 1)[1] for c in rounds.table.columns if c.startswith(BASELINE)})
    columns = [f"{c}|{m}" for c in (BASELINE, *singles) for m in modules]
    if any(c not in rounds.table for c in columns) or not modules:
        return None
    joint = rounds.select(columns)
    if len(joint.table) < 2:
        return None

    def statistic(c: Mapping[str, np.ndarray]) -> float:
        base = np.array([np.mean(c[f"{BASELINE}|{m}"]) for m in modules])
        weights = base / base.sum()
        kept = np.ones(len(modules))
        for single in singles:
            seconds = np.array([np.mean(c[f"{single}|{m}"]) for m in modules])
            # a module the baseline never spends time in weighs nothing
            kept *= np.divide(seconds, base, out=np.ones_like(base), where=base > 0)
        return float(1 - np.sum(weights * kept))

    return estimate(joint, statistic)


def _row_dict(label: str, source: str, estimate: Estimate | None) -> dict[str, Any] | None:
    return None if estimate is None else {"label": label, "source": source, **estimate.to_dict()}


def judge(
    samples: pd.DataFrame,
    transforms: Sequence[str],
    preflight: dict[str, dict[str, Any]],
    protocol: Protocol | None = None,
    confidence: float = CONFIDENCE,
) -> SuiteVerdict:
    """The verdict over the given transforms (in stacking order), from stored samples.

    `confidence` is the residuals' (a run that looked at its verdict on the way states them
    at the confidence its stopping rule leaves: `bench.judge.stopping`)."""
    protocol = protocol or Protocol()
    measured = _measured_configs(samples)
    excluded = {}
    for name in transforms:
        if name not in measured:
            record = preflight.get(name, {})
            excluded[name] = record.get("reason") or "its single configuration was not measured"
    covered = [t for t in transforms if t not in excluded]
    stack = config_name(covered) if len(covered) >= 2 else None
    verdict = SuiteVerdict(covered, stack, excluded)
    latency_rounds = rounds_of(samples, TIME_METRIC[1])
    verdict.components = _components(latency_rounds)
    verdict.resolution = _resolution(verdict.components, len(covered))
    latency = locations(latency_rounds)
    if BASELINE not in measured:
        verdict.problems.append("no verdict: the baseline was not measured")
        return verdict
    if stack is None:
        verdict.problems.append("no verdict: it needs at least two transforms measured alone")
        return verdict
    if stack not in measured:
        verdict.problems.append(f"no verdict: the stack {stack} was not measured")
        return verdict
    names = [BASELINE, *covered, stack]
    hierarchical = hierarchical_prediction(samples, covered)
    judged = [(TIME_METRIC[0], TIME_METRIC[1], latency, hierarchical)]
    for metric in RESTATED:
        rounds = locations(rounds_of(samples, metric))
        if rounds.table.empty or any(n not in rounds.table for n in names):
            continue
        source = _source(samples, metric)
        if metric == "energy_j" and source == "measured":
            judged.append((LABELS[metric], metric, rounds, None))
        else:
            verdict.restated.append(_restated(samples, metric, rounds, names, source))
    for label, metric, rounds, prediction in judged:
        if rounds.table.empty or any(n not in rounds.table for n in names):
            verdict.problems.append(f"{label}: not measured for every configuration")
            continue
        try:
            row = metric_verdict(
                metric,
                _unit(samples, metric),
                rounds,
                BASELINE,
                covered,
                stack,
                margin=protocol.margin,
                predicted_hierarchical=prediction,
                confidence=confidence,
            )
        except ValueError as error:
            verdict.problems.append(f"{label}: {error}")
            continue
        record = {"label": label, "source": _source(samples, metric), **row.to_dict()}
        record["aa_control"] = _row_dict("A/A", "", paired_saving(rounds, BASELINE, AA_CONTROL))
        record["p_value"] = row.residual.p_value()
        verdict.metrics.append(record)
        verdict.leave_one_out += _leave_one_out(rounds, covered, label)
        verdict.pairs += _pairs(rounds, covered, label, protocol.margin)
    verdict.memory = _memory(samples, covered, stack, protocol, verdict.problems)
    verdict.accuracy = _accuracy(preflight, covered, stack, verdict.problems)
    verdict.family = _family(verdict)
    return verdict


def _components(rounds: Rounds) -> dict[str, Any] | None:
    """The variance components of the run's latency (log scale, 0.01 ≈ 1%); None when the run
    has too few processes, rounds or configurations to tell them apart."""
    if rounds.table.empty or rounds.table.shape[1] < 2:
        return None
    try:
        return variance_components(rounds).to_dict()
    except ValueError:
        return None


def _resolution(components: dict[str, Any] | None, singles: int) -> dict[str, Any] | None:
    """The MDE (95% confidence, 80% power) this run's own noise gives one transform against
    the baseline and the interaction contrast of its singles."""
    if components is None or components["processes"] < 2:
        return None
    found = Components(**components)
    weight = contrast_weight(max(singles, 2))
    return {
        "mde_single_pct": 100 * resolution(found.measured_se(2), found.processes),
        "mde_interaction_pct": 100 * resolution(found.measured_se(weight), found.processes),
        "interaction_weight": weight,
        "how": "from the spread of the processes' located latencies (τ² + σ_eff²/K per "
        "process); the interaction contrast stack − Σ singles + (k − 1)·baseline weighs "
        f"{weight}/2 of a single's variance",
    }


def _restated(
    samples: pd.DataFrame, metric: str, rounds: Rounds, names: Sequence[str], source: str
) -> dict[str, Any]:
    """Shown, labelled, no word: the stack's saving and what the figure is made of."""
    stack = names[-1]
    measured = paired_saving(rounds, BASELINE, stack)
    how = (
        "estimated from CPU time × watts per core"
        if metric == "energy_j"
        else "derived: device-seconds × price"
    )
    return {
        "label": LABELS[metric],
        "metric": metric,
        "source": source,
        "measured": measured.to_dict() if measured else None,
        "note": f"{how}: it restates latency, so it gets no separate word",
    }


def _leave_one_out(rounds: Rounds, transforms: Sequence[str], label: str) -> list[dict[str, Any]]:
    """Each transform alone against added last to the others; the difference's interval is
    computed jointly over the four configurations involved."""
    stack = config_name(transforms)
    rows = []
    for name in transforms:
        without = config_name([t for t in transforms if t != name])
        involved = list(dict.fromkeys([BASELINE, name, without, stack]))
        if any(n not in rounds.table for n in involved):
            continue
        joint = rounds.select(involved)
        if len(joint.table) < 2:
            continue

        def difference(c: Mapping[str, np.ndarray], name: str = name, without: str = without):
            alone = saving_from_log(float(np.mean(np.log(c[name] / c[BASELINE]))))
            last = saving_from_log(float(np.mean(np.log(c[stack] / c[without]))))
            return last - alone

        alone = paired_saving(joint, BASELINE, name)
        added_last = paired_saving(joint, without, stack)
        diff = estimate(joint, difference)
        rows.append(
            {
                "metric": label,
                "transform": name,
                "alone": alone.to_dict() if alone else None,
                "added_last": added_last.to_dict() if added_last else None,
                "difference": diff.to_dict(),
                "p_value": diff.p_value(),
            }
        )
    return rows


def _pairs(
    rounds: Rounds, transforms: Sequence[str], label: str, margin: float
) -> list[dict[str, Any]]:
    """Per pair measured together (factorial design): its own verdict against eq 4.2."""
    rows = []
    if len(transforms) < 3:
        return rows  # with two transforms the pair is the stack: already judged
    for a, b in combinations(transforms, 2):
        both = config_name([a, b])
        if any(n not in rounds.table for n in (BASELINE, a, b, both)):
            continue
        row = metric_verdict(label, "", rounds, BASELINE, [a, b], both, margin=margin)
        rows.append({"metric": label, "pair": [a, b], **row.to_dict()})
        rows[-1]["p_value"] = row.residual.p_value()
    return rows


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: valid under any correlation between the tests."""
    p = np.asarray(p_values, dtype=float)
    finite = np.isfinite(p)
    adjusted = np.full(p.shape, np.nan)
    order = np.argsort(np.where(finite, p, np.inf))[: int(finite.sum())]
    m = order.size
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def _family(verdict: SuiteVerdict) -> dict[str, Any]:
    """How many rows were judged, that they are correlated, and Holm-adjusted p-values."""
    rows = [*verdict.metrics, *verdict.leave_one_out, *verdict.pairs]
    adjusted = holm([r.get("p_value", np.nan) for r in rows])
    for row, value in zip(rows, adjusted, strict=True):
        row["holm_p"] = value
    return {
        "rows": len(rows),
        "verdict_rows": len(verdict.metrics),
        "leave_one_out_rows": len(verdict.leave_one_out),
        "pair_rows": len(verdict.pairs),
        "note": (
            f"{len(rows)} rows were judged; they share the baseline and the singles, so they "
            "are correlated. Each row's p-value tests 'no departure' (0); holm_p is Holm's "
            "adjustment over the family, valid under any correlation."
        ),
    }


def _memory(
    samples: pd.DataFrame,
    transforms: Sequence[str],
    stack: str,
    protocol: Protocol,
    problems: list[str],
) -> dict[str, Any] | None:
    names = [BASELINE, *transforms, stack]
    for metric in PEAK_METRICS:
        table = process_table(samples, metric)
        if table.table.empty or any(n not in table.table for n in names):
            continue
        result = memory_verdict(
            table,
            metric,
            BASELINE,
            list(transforms),
            stack,
            protocol.memory_margin_mib,
            protocol.memory_margin_fraction,
        )
        return {"label": "peak memory", "source": _source(samples, metric), **result.to_dict()}
    problems.append("peak memory: not measured for every configuration")
    return None


def _accuracy(
    preflight: dict[str, dict[str, Any]],
    transforms: Sequence[str],
    stack: str,
    problems: list[str],
) -> dict[str, Any] | None:
    names = [BASELINE, *transforms, stack]
    correct = {n: preflight.get(n, {}).get("correct") for n in names}
    if not all(correct.values()):
        problems.append("accuracy: not scored for every configuration (cost-only model?)")
        return None
    result = accuracy_verdict(correct, BASELINE, list(transforms), stack)
    accuracy = {n: preflight[n].get("accuracy", {}) for n in names}
    return {**result.to_dict(), "accuracy": accuracy}
