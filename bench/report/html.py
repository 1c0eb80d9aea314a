"""report.html: the run's verdict, comparisons and pictures in one file that opens offline
(pictures inlined as data URIs, no scripts, no external resources)."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from bench.judge.analysis import RunTables
from bench.report.pictures import CAPTIONS

STYLE = """
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; } img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _percent(estimate: dict[str, Any] | None) -> str:
    if not estimate:
        return "-"
    return f"{estimate['point']:+.1%} [{estimate['lo']:+.1%}, {estimate['hi']:+.1%}]"


def _table(table_id: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def html_report(meta: dict[str, Any], tables: RunTables, images: dict[str, bytes]) -> str:
    verdict = tables.verdict
    environment = meta.get("environment") or {}
    model = meta.get("model") or {}
    facts = [
        f"model: {model.get('preset')} ({model.get('params')} parameters)",
        f"device: {environment.get('device')}, {(environment.get('cpu') or {}).get('model')}",
        f"commit: {((environment.get('git') or {}).get('commit') or '')[:10]}",
        f"rounds: {meta.get('rounds')}",
    ]
    verdict_rows = [
        [
            m["label"],
            _percent(m.get("measured")),
            _percent(m.get("predicted_independent")),
            _percent(m.get("predicted_hierarchical")),
            _percent(m.get("residual")),
            m["word"],
        ]
        for m in verdict.get("metrics", [])
    ]
    stack = verdict.get("stack") or "no stack (fewer than two transforms measured alone)"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>compound-bench run {escape(str(meta.get('run_id')))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>compound-bench run {escape(str(meta.get('run_id')))}</h1>",
        "<ul>" + "".join(f"<li>{escape(f)}</li>" for f in facts) + "</ul>",
        f"<h2>Verdict: does {escape(stack)} compound?</h2>",
        "<p>Δ &gt; 0 is a saving; intervals are 95% and include the variance between worker "
        "processes. The word follows report.md.</p>",
        _table(
            "verdict",
            ["metric", "measured stack Δ", "eq 4.2", "hierarchical", "residual", "verdict"],
            verdict_rows or [["-", "-", "-", "-", "-", "no verdict"]],
        ),
    ]
    if not tables.comparisons.empty:
        rows = [
            [r.config, r.label, f"{r.delta:+.1%} [{r.lo:+.1%}, {r.hi:+.1%}]", str(r.processes)]
            for r in tables.comparisons.itertuples()
        ]
        parts += [
            "<h2>Each configuration against the baseline</h2>",
            _table("comparisons", ["configuration", "metric", "Δ [95% CI]", "processes"], rows),
        ]
    for name, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        caption = escape(CAPTIONS.get(name, name))
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
            f"<figcaption>{caption} ({escape(name)})</figcaption></figure>"
        )
    if tables.flags:
        parts += ["<h2>Flags</h2>", "<ul>"]
        parts += [f"<li>{escape(flag)}</li>" for flag in tables.flags]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
