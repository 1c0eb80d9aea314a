"""report.md: the run's verdict and its evidence, readable without the tool.

Written from the same tables the terminal shows (all recomputed from samples.jsonl); every
figure carries its source, and "estimated" figures say how they were derived.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from bench.judge.analysis import COLD_MODALITY, RunTables
from bench.report.resolution import resolution_lines
from core.units import BYTES_PER_MIB, MS_PER_S, interval, pct

# How a transform's figure is shown, by its declared unit: (label suffix, scale, format).
FIGURE_UNITS: dict[str, tuple[str, float, str]] = {
    "s": (", ms", MS_PER_S, "{:.3f}"),
    "bytes": (", MiB", 1 / BYTES_PER_MIB, "{:.3f}"),
    "fraction": ("", 1.0, "{:.1%}"),
}
ESTIMATED_ENERGY = (
    "CPU energy is `estimated`: process CPU time × {watts} W per core (no RAPL or NVML "
    "counter was readable)."
)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (pipes in cells escaped)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict_rows(verdict: dict[str, Any]) -> list[list[str]]:
    return [
        [
            row["label"],
            interval(row["measured"]),
            interval(row["predicted_independent"]),
            interval(row["predicted_hierarchical"]),
            interval(row["residual"]),
            _ratio(row["interaction_ratio"]),
            f"**{row['word']}**",
            f"±{100 * row['margin']:.1f} pp",
            interval(row.get("aa_control")),
            row["source"],
            f"{row['processes']} / {row['n_rounds']}",
        ]
        for row in verdict["metrics"]
    ]


def _ratio(data: dict[str, float]) -> str:
    return f"{data['point']:.3f} [{data['lo']:.3f}, {data['hi']:.3f}]"


VERDICT_HEADER = (
    "metric",
    "measured stack Δ [95% CI]",
    "eq 4.2 from singles",
    "hierarchical",
    "residual [95% CI]",
    "stack / product of singles",
    "verdict",
    "margin",
    "A/A control",
    "source",
    "processes / rounds",
)


def _verdict_section(verdict: dict[str, Any]) -> list[str]:
    covered = " + ".join(verdict["transforms"]) or "none"
    out = ["## Verdict: do the savings compound?", ""]
    out.append(
        f"Stack: {covered}. Δ > 0 is a saving. Every interval includes the variance between "
        "worker processes. The word is an equivalence judgement on the residual (measured − "
        "eq 4.2): `compounds` only when its whole interval lies within the margin fixed "
        "before the run; a departure only when it excludes 0; otherwise `inconclusive`. "
        "The A/A control is a second baseline process: how far two identical processes differ."
    )
    for name, reason in verdict["excluded"].items():
        out.append(f"- left out of the verdict: {name}: {reason}")
    out.append("")
    if verdict["metrics"]:
        out += [markdown_table(VERDICT_HEADER, verdict_rows(verdict)), ""]
        for row in verdict["metrics"]:
            out.append(f"- {row['label']}: {row['statement']}")
            if row["note"]:
                out.append(f"- {row['label']}: {row['note']}")
    for row in verdict.get("restated") or []:
        shown = interval(row["measured"]) if row["measured"] else "-"
        out.append(f"- {row['label']} (`{row['source']}`): stack Δ {shown}; {row['note']}")
    memory = verdict.get("memory")
    if memory:
        out.append(
            f"- peak memory (`{memory['source']}`): **{memory['word']}**: {memory['statement']}"
        )
    out += [f"- {line}" for line in resolution_lines(verdict)]
    if verdict.get("family"):
        out.append(f"- {verdict['family']['note']}")
    for problem in verdict["problems"]:
        out.append(f"- {problem}")
    accuracy = verdict.get("accuracy")
    if accuracy:
        out += ["", "### Accuracy", ""]
        rows = [
            [name, *(f"{acc.get(m, float('nan')):.1%}" for m in ("image", "text"))]
            for name, acc in accuracy["accuracy"].items()
        ]
        out += [markdown_table(("configuration", "image", "text"), rows), ""]
        out.append(
            f"Stacked accuracy drop {interval(accuracy['stacked_drop'])} vs the sum of single "
            f"drops {interval(accuracy['sum_single_drops'])}: **{accuracy['word']}** "
            f"(difference {interval(accuracy['difference'])}, {accuracy['n_examples']} examples, "
            f"{accuracy['difference_method']})."
        )
        if accuracy["note"]:
            out.append(f"Note: {accuracy['note']}")
    return out


def _loo_section(verdict: dict[str, Any]) -> list[str]:
    if not verdict["leave_one_out"]:
        return []
    rows = [
        [
            r["metric"],
            r["transform"],
            interval(r["alone"]),
            interval(r["added_last"]),
            interval(r["difference"]),
            f"{r.get('holm_p', float('nan')):.3g}",
        ]
        for r in verdict["leave_one_out"]
    ]
    header = (
        "metric",
        "transform",
        "Δ alone",
        "Δ added last to the stack",
        "difference [95% CI]",
        "Holm p",
    )
    return [
        "## Leave-one-out",
        "",
        "Each transform's saving alone (vs the baseline) and added last (the full stack vs the "
        "stack without it); the difference's interval is computed jointly. An interval that "
        "excludes 0 is an interaction.",
        "",
        markdown_table(header, rows),
    ]


def _pairs_section(verdict: dict[str, Any]) -> list[str]:
    if not verdict["pairs"]:
        return []
    rows = [
        [
            r["metric"],
            " + ".join(r["pair"]),
            interval(r["measured"]),
            interval(r["predicted_independent"]),
            interval(r["residual"]),
            r["word"],
        ]
        for r in verdict["pairs"]
    ]
    header = ("metric", "pair", "measured Δ", "eq 4.2", "interaction", "verdict")
    return ["## Pairs measured together", "", markdown_table(header, rows)]


def _comparisons_section(comparisons: pd.DataFrame) -> list[str]:
    if comparisons.empty:
        return []
    rows = [
        [
            r.config,
            r.label,
            f"{pct(r.delta)} [{pct(r.lo)}, {pct(r.hi)}]",
            r.source,
            f"{r.processes} / {r.rounds}",
        ]
        for r in comparisons.itertuples()
    ]
    header = ("configuration", "metric", "Δ vs baseline [95% CI]", "source", "processes / rounds")
    return ["## Every configuration vs the baseline", "", markdown_table(header, rows)]


def _shares_section(shares: pd.DataFrame) -> list[str]:
    base = shares[shares.config == "baseline"]
    if base.empty:
        return []
    grouped = (
        base.assign(group=base["module"].str.replace(r"^layers\.\d+\.", "decoder ", regex=True))
        .groupby("group")["share"]
        .sum()
        .sort_values(ascending=False)
    )
    rows = [[module, f"{share:.1%}"] for module, share in grouped.items()]
    return [
        "## Module shares w_m (baseline, hooked passes)",
        "",
        markdown_table(("module", "share"), rows),
    ]


def _figures_section(summary: pd.DataFrame, declared: dict[str, dict[str, str]]) -> list[str]:
    """What the transforms reported, labelled as each transform declared it (run.json)."""
    rows = []
    for metric, figure in declared.items():
        suffix, scale, fmt = FIGURE_UNITS.get(figure["unit"], (f", {figure['unit']}", 1.0, "{:g}"))
        for r in summary[summary.metric == metric].itertuples():
            if pd.notna(r.median):
                when = "warm-up" if r.modality == COLD_MODALITY else "timed blocks"
                label = figure["label"] + suffix
                rows.append([r.config, label, when, fmt.format(r.median * scale), r.source, r.n])
    if not rows:
        return []
    header = ("configuration", "figure", "when", "median", "source", "n")
    return ["## What the transforms report", "", markdown_table(header, rows)]


def _serving_lines(meta: dict[str, Any]) -> list[str]:
    """Engine, dtype and batch sizes; the device's idle power; the memory plan's estimate."""
    config = meta.get("config") or {}
    serving = config.get("serving") or {}
    source = config.get("source") or {}
    sizes = serving.get("batch_sizes") or [1]
    lines = [
        f"- serving: engine {serving.get('engine', 'eager')}, {source.get('dtype', 'float32')}, "
        f"batch size {', '.join(str(s) for s in sizes)}"
        + (f" (tables and verdict at {sizes[0]}; the others below)" if len(sizes) > 1 else "")
    ]
    idle = meta.get("idle_power")
    if isinstance(idle, dict):
        lines.append(f"- device idle power (`measured`): {idle['watts']:.1f} W ({idle['method']})")
    plan = meta.get("memory_plan")
    if isinstance(plan, dict):
        total = plan["total"]["estimated_bytes"] / BYTES_PER_MIB
        lines.append(
            f"- memory plan (`estimated`): {total:,.0f} MiB per worker × "
            f"{plan['workers_alive_at_once']} alive at once, "
            f"{plan['free_bytes'] / BYTES_PER_MIB:,.0f} MiB free"
        )
    return lines


BATCH_HEADER = ("config", "batch", "latency/request", "TTFT", "decode/token", "requests/s")
BATCH_HEADER += ("tokens/s", "× throughput")


def _batches_section(batches: pd.DataFrame, verdict: dict[str, Any]) -> list[str]:
    """Medians per configuration and batch size, and the verdict's word at each further size."""
    if batches.empty or batches["batch_size"].nunique() < 2:
        return []
    wide = batches.pivot_table(
        index=["config", "batch_size"], columns="metric", values="median", aggfunc="first"
    )
    ratio = batches.dropna(subset=["throughput_x"]).set_index(["config", "batch_size"])
    rows = []
    for (config, size), row in wide.iterrows():

        def ms(metric: str, row: pd.Series = row) -> str:
            value = row.get(metric)
            return "-" if value is None or pd.isna(value) else f"{value * MS_PER_S:.2f} ms"

        x = ratio["throughput_x"].get((config, size))
        rows.append(
            [
                config,
                size,
                ms("latency_e2e_s"),
                ms("latency_prefill_s"),
                ms("latency_decode_per_token_s"),
                f"{row.get('throughput_rps', float('nan')):.1f}",
                f"{row.get('throughput_tps', float('nan')):.1f}",
                "-" if x is None else f"{x:.2f}×",
            ]
        )
    out = [
        "## Batch sizes",
        "",
        "Medians over rounds; every request of a batch shares its batch's latency. × throughput "
        "is against the same configuration at the first batch size.",
        "",
        markdown_table(BATCH_HEADER, rows),
    ]
    for size, other in (verdict.get("by_batch_size") or {}).items():
        for row in other.get("metrics") or []:
            out.append(f"- at batch {size}, {row['label']}: **{row['word']}**: {row['statement']}")
    return out


def markdown_report(meta: dict[str, Any], tables: RunTables) -> str:
    model = meta.get("model") or {}
    environment = meta.get("environment") or {}
    trained = "trained" if model.get("trained") else "UNTRAINED (random weights, cost only)"
    gpu = environment.get("gpu") or {}
    device = gpu.get("name") if isinstance(gpu, dict) and gpu.get("name") else None
    cpu = environment.get("cpu") or {}
    device = device or f"CPU {cpu.get('model')} ({cpu.get('torch_threads')} threads)"
    commit = ((environment.get("git") or {}).get("commit") or "")[:10]
    lines = [
        f"# compound-bench run {meta['run_id']}",
        "",
        f"- model: {model.get('preset') or model.get('source')} "
        f"({model.get('params', 0):,} parameters, {trained})",
        f"- device: {device}; torch {(environment.get('versions') or {}).get('torch')}; "
        f"commit {commit or '?'}; {meta.get('rounds')} rounds"
        + (" (stopped by the time budget)" if meta.get("stopped_by_budget") else ""),
    ]
    lines += _serving_lines(meta)
    for name, reason in (meta.get("skipped_transforms") or {}).items():
        lines.append(f"- skipped transform {name}: {reason}")
    if tables.busy.get("message"):
        lines.append(f"- **{tables.busy['message']}**")
    lines.append("")
    verdict = tables.verdict
    lines += _verdict_section(verdict)
    for section in (
        _loo_section(verdict),
        _pairs_section(verdict),
        _batches_section(tables.batches, verdict),
        _comparisons_section(tables.comparisons),
        _shares_section(tables.shares),
        _figures_section(tables.summary, meta.get("transform_figures") or {}),
    ):
        if section:
            lines += ["", *section]
    failures = tables.failures.to_dict(orient="records")
    notes = [f"failed or rejected: {f['config']}: {f['error']}" for f in failures]
    notes += [f"flag: {flag}" for flag in tables.flags]
    if (tables.summary.query("metric == 'energy_j'")["source"] == "estimated").any():
        watts = meta["config"]["protocol"]["watts_per_core"]
        notes.append(ESTIMATED_ENERGY.format(watts=watts))
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"
