"""The suite's verdict, from stored samples: do the transforms' savings compound?

Per metric (latency, energy, peak memory, cost): the measured stack's saving with its CI, the
eq 4.2 prediction from the singles, the hierarchical prediction from module shares and local
savings (time-based metrics only), the residual and one word judged by the residual's interval
(`bench.judge.verdict`). Around it: accuracy (stacked loss vs the sum of single losses), the
leave-one-out table (each transform's saving alone vs added last to the stack), and, from a
factorial design, a verdict per pair.

Only configurations that were measured count: a transform whose single was skipped, rejected
or failed is left out, and the verdict is over the stack of the others when that stack exists.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from bench.designs import AA_CONTROL, BASELINE, config_name
from bench.judge.analysis import block_values, paired_saving, timed
from bench.judge.formulas import compound_hierarchical
from bench.judge.shares import module_seconds, shares_of
from bench.judge.verdict import COMPOUNDS, accuracy_verdict, metric_verdict
from core.errors import CompoundError

# label → candidate metrics (the first one measured is used), and whether time shares apply.
VERDICT_METRICS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("latency", ("latency_mean_s",), True),
    ("energy", ("energy_j",), False),
    ("peak memory", ("peak_allocated_bytes", "peak_rss_bytes"), False),
    ("cost", ("cost_usd_per_1k",), True),  # device-seconds × price: proportional to time
)


@dataclass
class SuiteVerdict:
    transforms: list[str]  # those the verdict covers, in stacking order
    stack: str | None
    excluded: dict[str, str] = field(default_factory=dict)  # transform → why it is left out
    metrics: list[dict[str, Any]] = field(default_factory=list)
    accuracy: dict[str, Any] | None = None
    leave_one_out: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _measured_configs(samples: pd.DataFrame) -> set[str]:
    return set(timed(samples).query("metric == 'block_seconds'")["config"])


def _metric_table(samples: pd.DataFrame, candidates: Sequence[str]) -> tuple[str, pd.DataFrame]:
    for metric in candidates:
        table = block_values(samples, metric)
        if not table.empty and np.isfinite(table.to_numpy(dtype=float)).any():
            return metric, table
    return candidates[-1], pd.DataFrame()


def _source(samples: pd.DataFrame, metric: str) -> str:
    return "/".join(sorted(set(timed(samples).query("metric == @metric")["source"]))) or "-"


def hierarchical_prediction(
    seconds: pd.DataFrame, singles: Sequence[str], targets: dict[str, list[str]]
) -> float | None:
    """Δ_total = 1 − Σ_m w_m·Π_t(1 − Δ_t,m) with the baseline's shares w_m and each single's
    local saving Δ_t,m on the modules it targets (time outside them, e.g. a wake, is not seen).
    """
    if seconds.empty or BASELINE not in seconds.index:
        return None
    if any(s not in seconds.index for s in singles):
        return None
    base = seconds.loc[BASELINE]
    shares = shares_of(seconds).loc[BASELINE].to_dict()
    local: dict[str, list[float]] = {m: [] for m in shares}
    for single in singles:
        for module in targets.get(single, []):
            if module in local and base[module] > 0:
                local[module].append(float(1 - seconds.loc[single, module] / base[module]))
    try:
        return compound_hierarchical(shares, local)
    except CompoundError:  # a share or local saving out of range (noise on a tiny module)
        return None


def target_modules(pattern_targets: dict[str, list[str]], modules: Sequence[str]) -> dict:
    """Expand each transform's target handles (names or patterns) over the timed modules."""
    return {
        name: [m for m in modules if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
        for name, patterns in pattern_targets.items()
    }


def _delta_row(table: pd.DataFrame, base: str, opt: str, seed: int) -> dict[str, float] | None:
    estimate = paired_saving(table, base, opt, seed)
    if estimate is None:
        return None
    return {"point": estimate.point, "lo": estimate.lo, "hi": estimate.hi}


def _leave_one_out(
    table: pd.DataFrame, transforms: Sequence[str], label: str, seed: int
) -> list[dict[str, Any]]:
    stack = config_name(transforms)
    rows = []
    for name in transforms:
        without = config_name([t for t in transforms if t != name])
        alone = _delta_row(table, BASELINE, name, seed)
        added_last = _delta_row(table, without, stack, seed)
        if alone is None or added_last is None:
            continue
        rows.append(
            {
                "metric": label,
                "transform": name,
                "alone": alone,
                "added_last": added_last,
                "difference": added_last["point"] - alone["point"],
            }
        )
    return rows


def _values(table: pd.DataFrame, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: table[n].to_numpy(dtype=float) for n in names}


def judge(
    samples: pd.DataFrame,
    transforms: Sequence[str],
    preflight: dict[str, dict[str, Any]],
    seed: int = 0,
) -> SuiteVerdict:
    """The verdict over the given transforms (in stacking order), from stored samples."""
    measured = _measured_configs(samples)
    excluded = {}
    for name in transforms:
        if name not in measured:
            record = preflight.get(name, {})
            excluded[name] = record.get("reason") or "its single configuration was not measured"
    covered = [t for t in transforms if t not in excluded]
    stack = config_name(covered) if len(covered) >= 2 else None
    verdict = SuiteVerdict(covered, stack, excluded)
    if BASELINE not in measured:
        verdict.problems.append("no verdict: the baseline was not measured")
        return verdict
    if stack is None:
        verdict.problems.append("no verdict: it needs at least two transforms measured alone")
        return verdict
    if stack not in measured:
        verdict.problems.append(f"no verdict: the stack {stack} was not measured")
        return verdict
    seconds = module_seconds(samples)
    targets = target_modules(
        {t: preflight.get(t, {}).get("targets", []) for t in covered}, list(seconds.columns)
    )
    hierarchical = hierarchical_prediction(seconds, covered, targets)
    names = [BASELINE, *covered, stack]
    for label, candidates, time_based in VERDICT_METRICS:
        metric, table = _metric_table(samples, candidates)
        if table.empty or any(n not in table for n in names):
            verdict.problems.append(f"{label}: not measured for every configuration")
            continue
        try:
            row = metric_verdict(
                metric,
                str(timed(samples).query("metric == @metric")["unit"].iloc[0]),
                _values(table, names),
                BASELINE,
                covered,
                stack,
                predicted_hierarchical=hierarchical if time_based else None,
                seed=seed,
            )
        except ValueError as error:
            verdict.problems.append(f"{label}: {error}")
            continue
        record = {"label": label, "source": _source(samples, metric), **row.to_dict()}
        _add_aa_control(record, table, seed)
        verdict.metrics.append(record)
        verdict.leave_one_out += _leave_one_out(table, covered, label, seed)
        verdict.pairs += _pairs(table, covered, label, seed)
    verdict.accuracy = _accuracy(preflight, covered, stack, seed, verdict.problems)
    return verdict


def _add_aa_control(record: dict[str, Any], table: pd.DataFrame, seed: int) -> None:
    """Set the A/A difference beside the row, and say when the word does not survive it.

    Pairing by round cancels drift but not a fixed per-process offset; the A/A control
    measures that offset directly. A word other than "compounds" whose residual interval,
    widened by it, would include 0 may reflect the worker processes rather than the transforms.
    """
    aa = _delta_row(table, BASELINE, AA_CONTROL, seed)
    record["aa_control"] = aa
    if aa is None or record["word"] == COMPOUNDS:
        return
    floor = max(abs(aa["lo"]), abs(aa["hi"]))
    residual = record["residual"]
    if residual["lo"] - floor <= 0 <= residual["hi"] + floor:
        note = (
            f"not robust to process noise: the A/A control differs by up to {floor:.2%}, and "
            "the residual widened by that includes 0"
        )
        record["note"] = "; ".join(n for n in (record["note"], note) if n)


def _pairs(
    table: pd.DataFrame, transforms: Sequence[str], label: str, seed: int
) -> list[dict[str, Any]]:
    """Per pair measured together (factorial design): its own verdict against eq 4.2."""
    rows = []
    if len(transforms) < 3:
        return rows  # with two transforms the pair is the stack: already judged
    for a, b in combinations(transforms, 2):
        both = config_name([a, b])
        if any(n not in table for n in (BASELINE, a, b, both)):
            continue
        values = _values(table, [BASELINE, a, b, both])
        row = metric_verdict(label, "", values, BASELINE, [a, b], both, seed=seed)
        rows.append({"metric": label, "pair": [a, b], **row.to_dict()})
    return rows


def _accuracy(
    preflight: dict[str, dict[str, Any]],
    transforms: Sequence[str],
    stack: str,
    seed: int,
    problems: list[str],
) -> dict[str, Any] | None:
    names = [BASELINE, *transforms, stack]
    correct = {n: preflight.get(n, {}).get("correct") for n in names}
    if not all(correct.values()):
        problems.append("accuracy: not scored for every configuration (cost-only model?)")
        return None
    result = accuracy_verdict(correct, BASELINE, list(transforms), stack, seed=seed)
    accuracy = {n: preflight[n].get("accuracy", {}) for n in names}
    return {**result.to_dict(), "accuracy": accuracy}
