"""The reports a finished run prints and writes, rendered from known (planted) measurements:
the terminal tables (`render_run`, `verdict_table`) and report.md (`markdown_report`)."""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
import pytest
from rich.console import Console

from bench.judge.analysis import RunTables, comparisons, summary_table
from bench.judge.shares import module_shares
from bench.judge.suite_verdict import judge
from bench.report.markdown import markdown_report
from bench.report.terminal import render_run, verdict_table
from tests.test_suite import ROUNDS, planted_samples

STACK = "token_pruning+fused_qkv"
# planted_samples' configurations "a" and "b", under real transform names.
NAMES = {"baseline": "baseline", "a": "token_pruning", "b": "fused_qkv", "a+b": STACK}
CHECKS = {
    "token_pruning": {"targets": ["m1"]},
    "fused_qkv": {"targets": ["m2"]},
    "vision_sleep": {"reason": "needs cuda"},
}
FAILURES = pd.DataFrame([{"config": "broken", "error": "worker died (exit -9)"}])
FLAGS = [
    "energy: 2 window(s) read zero or failed (kept as missing)",
    "noisy: baseline latency_mean_s: IQR/median 12% > 10%",
    "noisy: fused_qkv energy_j: IQR/median 15% > 10%",
]
META: dict[str, Any] = {
    "run_id": "r-known",
    "model": {"preset": "tiny", "params": 1_234_567, "trained": True},
    "rounds": ROUNDS,
    "environment": {
        "device": "cpu",
        "gpu": None,
        "cpu": {"model": "Test CPU", "torch_threads": 2},
        "versions": {"torch": "2.test"},
        "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False},
    },
    "config": {"protocol": {"watts_per_core": 10.0}},
}


def planted(
    stack_saving: float,
    noise: float = 0.0,
    transforms=("token_pruning", "fused_qkv", "vision_sleep"),
):
    """Planted rounds: the singles save 10% and 20%, the stack `stack_saving`.

    Without noise every paired ratio is exact, so each Δ and its CI are known to the digit.
    """
    samples = planted_samples(
        {"baseline": 0.0, "a": 0.10, "b": 0.20, "a+b": stack_saving}, noise=noise
    )
    samples["config"] = samples["config"].map(NAMES)
    return samples, list(transforms)


def run_tables(samples: pd.DataFrame, transforms: list[str]) -> RunTables:
    summary = summary_table(samples)
    return RunTables(
        summary=summary,
        shares=module_shares(samples),
        comparisons=comparisons(samples, "baseline"),
        flags=list(FLAGS),
        failures=FAILURES,
        verdict=judge(samples, transforms, CHECKS).to_dict(),
    )


def render(renderable: Any) -> str:
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def table_rows(text: str) -> list[list[str]]:
    """The body rows of every table in the text, each as its stripped cells."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in text.splitlines()
        if line.strip().startswith("│")
    ]


def between(text: str, start: str, end: str | None) -> str:
    """The text from the first line holding `start` up to the first later line holding `end`."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if start in line)
    last = len(lines)
    if end is not None:
        last = next(i for i in range(first + 1, len(lines)) if end in lines[i])
    return "\n".join(lines[first:last])


@pytest.mark.parametrize(
    ("stack_saving", "noise", "word", "shown", "ci", "eq42"),
    [
        # 1 − 0.9 × 0.8 = 28%: what eq 4.2 predicts. A residual of exactly 0 needs noise around
        # it to be judged at all (seeded, so the figures are fixed to the digit).
        (0.28, 0.004, "compounds", "+28.0", "[+27.8, +28.2]", "+28.1"),
        (0.38, 0.0, "super-multiplicative", "+38.0", "[+38.0, +38.0]", "+28.0"),
        (0.18, 0.0, "sub-multiplicative", "+18.0", "[+18.0, +18.0]", "+28.0"),
    ],
)
def test_render_run_shows_header_configurations_verdict_flags_and_failures(
    stack_saving, noise, word, shown, ci, eq42
):
    text = render(render_run(META, run_tables(*planted(stack_saving, noise))))
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "run r-known: tiny (1,234,567 params, trained); 40 rounds on cpu"

    # Every configuration has its row (a stack's name wraps after each "+").
    configurations = between(text, "per configuration", "verdict: does")
    first_cells = [row[0] for row in table_rows(configurations)]
    assert first_cells == ["baseline", "fused_qkv", "token_pruning", "token_pruning+", "fused_qkv"]

    # The verdict table: each metric's measured stack Δ over its CI, and its word.
    verdict = between(text, "verdict: does token_pruning + fused_qkv compound?", None)
    rows = table_rows(verdict)
    pairs = zip(rows, rows[1:], strict=False)  # each row with the CI line under it
    by_metric = {row[0]: (row, below) for row, below in pairs if row[0]}
    assert set(by_metric) == {"latency"}  # estimated energy and cost restate it: no word
    row, below = by_metric["latency"]
    assert (row[1], below[1]) == (shown, ci), (row, below)
    assert row[2] == eq42  # eq 4.2 from the singles
    assert row[3] == "+14.0"  # hierarchical: 0.6 × 10% + 0.4 × 20%
    assert row[6] == word, row
    assert any(line.startswith("energy (estimated): stack Δ ") for line in lines)
    assert any("restates latency" in line for line in lines)
    assert any(line.startswith("peak memory: additive: ") for line in lines)
    assert any(line.startswith("noise: round effect ρ") for line in lines)
    assert any(line.startswith("resolution: this run") for line in lines)
    assert "left out: vision_sleep: needs cuda" in lines
    assert "flag: energy: 2 window(s) read zero or failed (kept as missing)" in lines
    assert "flag: 2 noisy metric(s) (IQR/median > 10%); see report.md" in lines
    assert not any(line.startswith("flag: noisy") for line in lines)  # summarised, not listed
    assert "failed: broken: worker died (exit -9)" in lines


def test_render_run_without_two_transforms_has_no_verdict_table_and_says_why():
    samples, _ = planted(0.28)
    samples = samples[samples.config.isin(["baseline", "token_pruning"])]
    text = render(render_run(META, run_tables(samples, ["token_pruning"])))
    assert "verdict: does" not in text
    assert any("at least two transforms" in line for line in text.splitlines())
    first_cells = [row[0] for row in table_rows(text)]
    assert first_cells == ["baseline", "token_pruning"]


def test_verdict_table_rows_follow_the_verdict():
    samples, transforms = planted(0.38)
    verdict = judge(samples, transforms, CHECKS).to_dict()
    text = render(verdict_table(verdict))
    assert "verdict: does token_pruning + fused_qkv compound?" in text
    header = next(line for line in text.splitlines() if "metric" in line and "stack Δ" in line)
    assert [cell.strip() for cell in header.strip().strip("┃").split("┃")] == [
        "metric",
        "stack Δ",
        "eq 4.2",
        "hier.",
        "residual",
        "ratio",
        "verdict",
        "A/A",
    ]
    rows = [row for row in table_rows(text) if row[0]]
    assert [row[0] for row in rows] == ["latency"]
    latency = rows[0]
    # the stack costs 0.62 of the baseline, the singles' product 0.72: ratio 0.861
    assert latency[1:7] == ["+38.0", "+28.0", "+14.0", "+10.0", "0.861", "super-multiplicative"]
    assert latency[7] == "-"  # no A/A control configuration in this run


def test_markdown_report_labels_transform_figures_as_declared():
    samples, transforms = planted(0.28)
    extra = []
    for block in range(ROUNDS):
        for metric, value, unit in (
            ("sleep_wake_s", 0.0025, "s"),
            ("pruning_kept_fraction", 0.5, "fraction"),
            ("undeclared_figure_s", 9.0, "s"),
        ):
            extra.append(
                {
                    "config": STACK,
                    "block": block,
                    "metric": metric,
                    "value": value,
                    "unit": unit,
                    "module": "vision_encoder",
                    "source": "measured",
                    "extra": {},
                }
            )
    extra.append(
        {
            "config": STACK,
            "block": -1,
            "metric": "sleep_bytes_freed",
            "value": 3 * 2**20,
            "unit": "bytes",
            "module": "vision_encoder",
            "source": "derived",
            "extra": {},
        }
    )
    samples = pd.concat([samples, pd.DataFrame.from_records(extra)], ignore_index=True)
    meta = {
        **META,
        "transform_figures": {
            "sleep_wake_s": {
                "label": "vision-encoder wake latency",
                "unit": "s",
                "kind": "span",
                "module": "vision_encoder",
                "transform": "vision_sleep",
            },
            "sleep_bytes_freed": {
                "label": "bytes freed while asleep",
                "unit": "bytes",
                "kind": "applied",
                "module": "vision_encoder",
                "transform": "vision_sleep",
            },
            "pruning_kept_fraction": {
                "label": "image tokens kept",
                "unit": "fraction",
                "kind": "value",
                "module": "",
                "transform": "token_pruning",
            },
        },
    }
    report = markdown_report(meta, run_tables(samples, transforms))
    assert report.startswith("# compound-bench run r-known\n")
    section = between(report, "## What the transforms report", "## Notes")
    rows = [line for line in section.splitlines() if line.startswith(f"| {STACK} ")]
    assert sorted(rows) == sorted(
        [
            f"| {STACK} | vision-encoder wake latency, ms | timed blocks | 2.500 | measured | 40 |",
            f"| {STACK} | bytes freed while asleep, MiB | warm-up | 3.000 | derived | 1 |",
            f"| {STACK} | image tokens kept | timed blocks | 50.0% | measured | 40 |",
        ]
    )
    assert "undeclared_figure_s" not in report
    assert "compounds" in between(report, "## Verdict", "## Leave-one-out")
    assert "- failed or rejected: broken: worker died (exit -9)" in report


def test_markdown_report_outside_a_git_checkout_says_the_commit_is_unknown():
    """Outside a checkout the environment records commit None (see `git_state`)."""
    samples, transforms = planted(0.28)
    environment = {**META["environment"], "git": {"commit": None, "dirty": None}}
    report = markdown_report({**META, "environment": environment}, run_tables(samples, transforms))
    assert "commit ?;" in report
