"""Human-readable tables for a finished run; every figure says if it was measured or estimated."""

from __future__ import annotations

from typing import Any

import pandas as pd
from rich.console import Group
from rich.table import Table
from rich.text import Text

# (metric, modality, row label, scale, format) for the per-configuration table.
HEADLINE: tuple[tuple[str, str, str, float, str], ...] = (
    ("latency_e2e_s", "image", "e2e ms, image requests", 1e3, "{:.1f}"),
    ("latency_e2e_s", "text", "e2e ms, text requests", 1e3, "{:.1f}"),
    ("latency_prefill_s", "image", "TTFT ms, image", 1e3, "{:.1f}"),
    ("latency_prefill_s", "text", "TTFT ms, text", 1e3, "{:.1f}"),
    ("latency_decode_per_token_s", "text", "decode ms/token, text", 1e3, "{:.2f}"),
    ("latency_vision_encode_s", "image", "vision encode ms", 1e3, "{:.2f}"),
    ("latency_cold_s", "all", "cold first call ms", 1e3, "{:.0f}"),
    ("latency_mean_s", "all", "mean ms/request (block)", 1e3, "{:.1f}"),
    ("throughput_rps", "all", "requests/s", 1.0, "{:.1f}"),
    ("throughput_tps", "all", "tokens/s", 1.0, "{:.0f}"),
    ("energy_j", "all", "energy J/block", 1.0, "{:.2f}"),
    ("peak_rss_bytes", "all", "peak RSS MiB", 2**-20, "{:.0f}"),
    ("peak_allocated_bytes", "all", "GPU peak allocated MiB", 2**-20, "{:.0f}"),
    ("param_bytes", "all", "parameter MiB", 2**-20, "{:.2f}"),
    ("cost_usd_per_1k", "all", "$ per 1k requests", 1.0, "{:.5f}"),
    ("co2_g", "all", "gCO2 per block", 1.0, "{:.4f}"),
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
    return text + SOURCE_MARK.get(row["source"], "")


def configuration_table(summary: pd.DataFrame) -> Table:
    configs = list(dict.fromkeys(summary["config"]))
    table = Table(title="medians ±IQR/median (est = estimated, der = derived; rest measured)")
    table.add_column("metric")
    for config in configs:
        table.add_column(config, justify="right")
    for metric, modality, label, scale, fmt in HEADLINE:
        cells = [_cell(summary, c, metric, modality, scale, fmt) for c in configs]
        if any(cells):
            table.add_row(label, *[cell or "-" for cell in cells])
    return table


def shares_table(shares: pd.DataFrame, config: str) -> Table:
    """Module shares, with decoder layers folded into attention / mlp totals for readability."""
    table = Table(title=f"measured module shares w_i ({config}, hooked pass)")
    table.add_column("module")
    table.add_column("share", justify="right")
    rows = shares[shares.config == config].copy()
    rows["group"] = rows["module"].str.replace(r"^layers\.\d+\.", "decoder ", regex=True)
    grouped = rows.groupby("group", sort=False)["share"].sum()
    for module, share in grouped.sort_values(ascending=False).items():
        table.add_row(module, f"{share:.1%}")
    table.add_row("sum", f"{grouped.sum():.3f}")
    return table


def comparison_table(comparisons: pd.DataFrame) -> Table:
    table = Table(title="Δ vs baseline (positive = saving), 95% bootstrap CI over paired rounds")
    for column in ("configuration", "metric", "Δ", "95% CI", "source"):
        table.add_column(column)
    for row in comparisons.itertuples():
        table.add_row(
            row.config,
            row.label,
            f"{row.delta:+.2%}",
            f"[{row.lo:+.2%}, {row.hi:+.2%}]",
            row.source,
        )
    return table


def render_run(meta: dict[str, Any], tables: dict[str, Any]) -> Group:
    model = meta.get("model") or {}
    parts: list[Any] = []
    trained = "trained" if model.get("trained") else "UNTRAINED (random weights, cost only)"
    params = model.get("params", 0)
    header = f"run {meta['run_id']}: {model.get('preset')} ({params:,} params, {trained})"
    if meta.get("accuracy"):
        header += "; test accuracy " + ", ".join(
            f"{k} {v:.1%}" for k, v in meta["accuracy"].items()
        )
    header += f"; {meta.get('rounds')} rounds on {meta['environment'].get('device')}"
    parts.append(Text(header, style="bold"))
    parts.append(configuration_table(tables["summary"]))
    shares = tables["shares"]
    if not shares.empty:
        parts.append(shares_table(shares, str(shares.config.iloc[0])))
    if not tables["comparisons"].empty:
        parts.append(comparison_table(tables["comparisons"]))
    for flag in tables["flags"]:
        parts.append(Text(f"flag: {flag}", style="yellow"))
    for failure in tables["failures"].to_dict(orient="records"):
        parts.append(Text(f"failed: {failure['config']}: {failure['error']}", style="red"))
    return Group(*parts)
