"""Human-readable tables for a finished run; every figure says if it was measured or estimated."""

from __future__ import annotations

from typing import Any

import pandas as pd
from rich.console import Group
from rich.table import Table
from rich.text import Text

from bench.judge.analysis import RunTables
from bench.report.resolution import resolution_lines
from core.units import BYTES_PER_MIB, MS_PER_S, interval

# The per-configuration table's columns: (metric, modality, label, scale, format).
COLUMNS: tuple[tuple[str, str, str, float, str], ...] = (
    ("latency_mean_s", "all", "mean ms/request (block)", MS_PER_S, "{:.1f}"),
    ("latency_e2e_s", "image", "e2e ms, image requests", MS_PER_S, "{:.1f}"),
    ("latency_e2e_s", "text", "e2e ms, text requests", MS_PER_S, "{:.1f}"),
    ("energy_j", "all", "energy J/block", 1.0, "{:.2f}"),
    ("peak_rss_bytes", "all", "peak RSS MiB", 1 / BYTES_PER_MIB, "{:.0f}"),
)
SOURCE_MARK = {"measured": "", "estimated": " est", "derived": " der", "declared": " decl"}


def _cell(
    summary: pd.DataFrame, config: str, metric: str, modality: str, scale: float, fmt: str
) -> str | None:
    rows = summary[
        (summary.config == config) & (summary.metric == metric) & (summary.modality == modality)
    ]
    if rows.empty or pd.isna(rows.iloc[0].get("median")):
        return None
    row = rows.iloc[0]
    text = fmt.format(row["median"] * scale)
    if pd.notna(row.get("rel_iqr")) and row["n"] > 1:
        text += f" ±{row['rel_iqr']:.0%}"
    if pd.notna(row.get("tail")) and bool(row["tail"]):
        text += f" (mean {row['mean'] * scale:.3g}: tail)"
    return text + SOURCE_MARK.get(row["source"], "")


def configuration_table(summary: pd.DataFrame, accuracy: dict[str, dict[str, float]]) -> Table:
    """One row per configuration: the headline medians and its accuracy."""
    configs = list(dict.fromkeys(summary["config"]))
    table = Table(title="per configuration: medians ±IQR/median (est = estimated)")
    table.add_column("configuration", overflow="fold")
    for column in COLUMNS:
        table.add_column(column[2], justify="right", overflow="fold")
    table.add_column("accuracy image/text", justify="right")
    for config in configs:
        cells = [
            _cell(summary, config, m, mod, scale, fmt) or "-" for m, mod, _, scale, fmt in COLUMNS
        ]
        acc = accuracy.get(config) or {}
        score = "/".join(f"{acc[k]:.1%}" for k in ("image", "text") if k in acc) or "-"
        table.add_row(config.replace("+", "+\n"), *cells, score)
    return table


def verdict_table(verdict: dict[str, Any]) -> Table:
    stack = " + ".join(verdict["transforms"])
    table = Table(
        title=f"verdict: does {stack} compound? Δ > 0 saves; % with [95% CI] over processes",
        caption="eq 4.2 from the singles; hier. = hierarchical (every module's time); "
        "ratio = stack / product of the singles; A/A = two identical baseline processes",
    )
    for column in ("metric", "stack Δ", "eq 4.2", "hier.", "residual", "ratio", "verdict", "A/A"):
        table.add_column(column, overflow="fold")
    for row in verdict["metrics"]:
        table.add_row(
            row["label"] + SOURCE_MARK.get(row["source"], ""),
            _interval(row["measured"]),
            _interval(row["predicted_independent"]),
            _interval(row["predicted_hierarchical"]),
            _interval(row["residual"]),
            _ratio(row["interaction_ratio"]),
            Text(row["word"], style="bold"),
            _interval(row.get("aa_control")),
        )
    return table


def _ratio(data: dict[str, float]) -> str:
    return f"{data['point']:.3f}\n[{data['lo']:.3f}, {data['hi']:.3f}]"


def _interval(data: dict[str, float] | None) -> str:
    """A point over its CI, in percent (the table's title says so): "+12.3" / "[+10.1, +14.2]"."""
    return interval(data, places=1, unit="", separator="\n")


def _inline(data: dict[str, float]) -> str:
    return interval(data, places=1, unit="") + " %"


def render_run(meta: dict[str, Any], tables: RunTables) -> Group:
    model = meta.get("model") or {}
    parts: list[Any] = []
    trained = "trained" if model.get("trained") else "UNTRAINED (random weights, cost only)"
    params = model.get("params", 0)
    header = f"run {meta['run_id']}: {model.get('preset')} ({params:,} params, {trained})"
    header += f"; {meta.get('rounds')} rounds on {meta['environment'].get('device')}"
    parts.append(Text(header, style="bold"))
    config = meta.get("config") or {}
    serving = config.get("serving") or {}
    sizes = serving.get("batch_sizes") or [1]
    parts.append(
        Text(
            f"serving: engine {serving.get('engine', 'eager')}, "
            f"{(config.get('source') or {}).get('dtype', 'float32')}, batch size "
            + ", ".join(str(size) for size in sizes)
            + (f" (tables at {sizes[0]}; every size in batches.csv)" if len(sizes) > 1 else "")
        )
    )
    for size, other in (tables.verdict.get("by_batch_size") or {}).items():
        for row in other.get("metrics") or []:
            parts.append(Text(f"at batch {size}, {row['label']}: {row['word']}"))
    if tables.busy.get("message"):
        parts.append(Text(tables.busy["message"], style="bold red"))
    verdict = tables.verdict
    accuracy = (verdict.get("accuracy") or {}).get("accuracy") or {}
    if not accuracy and meta.get("accuracy"):
        accuracy = {"baseline": meta["accuracy"]}
    parts.append(configuration_table(tables.summary, accuracy))
    if verdict["metrics"]:
        parts.append(verdict_table(verdict))
    for row in verdict["metrics"]:
        parts.append(Text(f"{row['label']}: {row['statement']}"))
        if row["note"]:
            parts.append(Text(f"{row['label']}: {row['note']}"))
    for row in verdict.get("restated") or []:
        measured = row["measured"]
        shown = _inline(measured) if measured else "-"
        parts.append(Text(f"{row['label']} ({row['source']}): stack Δ {shown}; {row['note']}"))
    if verdict.get("memory"):
        parts.append(
            Text(f"peak memory: {verdict['memory']['word']}: {verdict['memory']['statement']}")
        )
    if verdict.get("accuracy"):
        acc = verdict["accuracy"]
        parts.append(
            Text(
                f"accuracy: stacked drop {_inline(acc['stacked_drop'])} vs summed single "
                f"drops {_inline(acc['sum_single_drops'])}: {acc['word']}; {acc['note']}"
            )
        )
    parts += [Text(line) for line in resolution_lines(verdict)]
    if verdict.get("family"):
        parts.append(Text(verdict["family"]["note"]))
    for line in [
        *verdict["problems"],
        *(f"left out: {k}: {v}" for k, v in verdict["excluded"].items()),
    ]:
        parts.append(Text(line, style="yellow"))
    noisy = [f for f in tables.flags if f.startswith("noisy")]
    for flag in tables.flags:
        if not flag.startswith("noisy"):
            parts.append(Text(f"flag: {flag}", style="yellow"))
    if noisy:
        parts.append(
            Text(
                f"flag: {len(noisy)} noisy metric(s) (IQR/median > 10%); see report.md",
                style="yellow",
            )
        )
    for failure in tables.failures.to_dict(orient="records"):
        parts.append(Text(f"failed: {failure['config']}: {failure['error']}", style="red"))
    return Group(*parts)
