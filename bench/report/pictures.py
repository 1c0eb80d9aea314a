"""A run in pictures (matplotlib, PNG beside report.md): where the stack's saving comes from,
predicted against measured, accuracy against cost, and the rounds in order (drift).

Each function takes the run's tables and returns the PNG's bytes, or None when the run holds
nothing to draw (no stack, no verdict, no accuracy); `pictures` collects what there is.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bench.designs import BASELINE  # noqa: E402
from bench.judge.analysis import RunTables, block_values  # noqa: E402

MODULE_GROUPS = (
    ("vision encoder", lambda m: m == "vision_encoder"),
    ("projector", lambda m: m == "projector"),
    ("decoder attention", lambda m: m.startswith("layers.") and m.endswith(".attention")),
    ("decoder MLP", lambda m: m.startswith("layers.") and m.endswith(".mlp")),
    ("LM head", lambda m: m == "lm_head"),
    ("other", lambda m: m == "other"),
)
CAPTIONS = {
    "waterfall.png": "Where the stack's time goes: each module group's change, baseline → stack "
    "(hooked pass, ms per block).",
    "predicted_vs_measured.png": "The stack's measured saving against eq 4.2 and the "
    "hierarchical prediction, 95% intervals over processes.",
    "pareto.png": "Accuracy against latency per configuration; the Pareto front is joined.",
    "rounds.png": "Mean latency per request in every round, in order: drift shows as a trend "
    "shared by all configurations.",
}


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _group_seconds(shares: pd.DataFrame, config: str) -> dict[str, float]:
    rows = shares[shares["config"] == config]
    return {
        name: float(rows[[test(m) for m in rows["module"]]]["seconds"].sum())
        for name, test in MODULE_GROUPS
    }


def waterfall(shares: pd.DataFrame, stack: str | None) -> bytes | None:
    if not stack or shares.empty or not {BASELINE, stack} <= set(shares["config"]):
        return None
    base, stacked = _group_seconds(shares, BASELINE), _group_seconds(shares, stack)
    figure, axis = plt.subplots(figsize=(7.5, 3.8))
    level = sum(base.values()) * 1e3
    levels = [level]
    axis.bar(0, level, color="#4c72b0")
    labels = ["baseline"]
    for i, (name, _) in enumerate(MODULE_GROUPS, start=1):
        change = (stacked[name] - base[name]) * 1e3
        axis.bar(i, change, bottom=level, color="#c44e52" if change > 0 else "#55a868")
        axis.annotate(
            f"{change:+.1f}",
            (i, max(level, level + change)),
            ha="center",
            fontsize=7,
            xytext=(0, 2),
            textcoords="offset points",
        )
        level += change
        levels.append(level)
        labels.append(name)
    axis.bar(len(labels), level, color="#4c72b0")
    labels.append("stack")
    spread = max(max(levels) - min(levels), 0.02 * max(levels))
    axis.set_ylim(min(levels) - spread, max(levels) + spread)  # the changes, legibly
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axis.set_ylabel("ms per block (hooked pass;\naxis does not start at 0)")
    axis.set_title(f"baseline → {stack}")
    return _png(figure)


def predicted_vs_measured(verdict: Mapping[str, Any]) -> bytes | None:
    rows = [m for m in verdict.get("metrics", []) if m.get("measured")]
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(7.5, 1.2 + 0.9 * len(rows)))
    kinds = (
        ("measured", "measured stack", "#4c72b0"),
        ("predicted_independent", "eq 4.2 from the singles", "#dd8452"),
        ("predicted_hierarchical", "hierarchical (modules)", "#8172b2"),
    )
    for row_index, row in enumerate(rows):
        for offset, (key, label, colour) in enumerate(kinds):
            estimate = row.get(key)
            if not estimate:
                continue
            y = row_index + (offset - 1) * 0.22
            point, lo, hi = (100 * estimate[k] for k in ("point", "lo", "hi"))
            axis.errorbar(
                point,
                y,
                xerr=[[point - lo], [hi - point]],
                fmt="o",
                color=colour,
                capsize=3,
                label=label if row_index == 0 else None,
            )
    axis.axvline(0, color="grey", linewidth=0.8)
    axis.set_yticks(range(len(rows)), [f"{r['label']}\n({r['word']})" for r in rows])
    axis.set_xlabel("saving of the stack, % (Δ > 0 saves)")
    axis.legend(loc="best", fontsize=8)
    return _png(figure)


def pareto(summary: pd.DataFrame, checks: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    latency = summary[
        (summary["metric"] == "latency_mean_s")
        & (summary["module"] == "total")
        & (summary["modality"] == "all")
    ].set_index("config")["median"]
    points = []
    for config, check in checks.items():
        accuracy = check.get("accuracy") or {}
        if config in latency.index and accuracy:
            points.append(
                (config, latency[config] * 1e3, 100 * sum(accuracy.values()) / len(accuracy))
            )
    if len(points) < 2:
        return None
    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    markers = "osD^vP*Xh<>"
    for index, (config, x, y) in enumerate(points):
        axis.scatter(x, y, marker=markers[index % len(markers)], label=config)
    front, best = [], float("-inf")
    for _config, x, y in sorted(points, key=lambda p: (p[1], -p[2])):
        if y > best:
            front.append((x, y))
            best = y
    axis.plot(*zip(*front, strict=True), color="grey", linewidth=1, linestyle="--")
    axis.set_xlabel("median latency per request, ms (block mean)")
    axis.set_ylabel("accuracy, % (mean of question types)")
    axis.set_title("dashed: the Pareto front (no configuration both faster and more accurate)")
    axis.legend(loc="best", fontsize=6)
    return _png(figure)


def round_traces(samples: pd.DataFrame) -> bytes | None:
    table = block_values(samples, "latency_mean_s")
    if table.empty or len(table) < 2:
        return None
    figure, axis = plt.subplots(figsize=(7.5, 3.8))
    for config in table.columns:
        values = table[config].dropna() * 1e3
        axis.plot(values.index, values.to_numpy(), marker=".", linewidth=0.7, label=config)
    axis.set_xlabel("round")
    axis.set_ylabel("ms per request")
    axis.legend(loc="best", fontsize=6, ncol=2)
    return _png(figure)


def pictures(
    tables: RunTables, samples: pd.DataFrame, checks: Mapping[str, Mapping[str, Any]]
) -> dict[str, bytes]:
    """File name → PNG bytes, for every picture the run has something to draw."""
    drawn = {
        "waterfall.png": waterfall(tables.shares, tables.verdict.get("stack")),
        "predicted_vs_measured.png": predicted_vs_measured(tables.verdict),
        "pareto.png": pareto(tables.summary, checks),
        "rounds.png": round_traces(samples),
    }
    return {name: png for name, png in drawn.items() if png is not None}
