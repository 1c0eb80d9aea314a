"""The suite around the transforms: designs, flag parsing, the preflight checks, the verdict on
planted measurements, and `compound run` with transforms end to end on `tiny`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.commands.common import parse_transforms
from bench.configuration import Configuration, TransformSpec
from bench.designs import AA_CONTROL, build_configurations, parse_designs
from bench.judge.suite_verdict import judge
from bench.measure.preflight import REJECTED, run_preflight
from bench.measure.workload import WorkloadSpec
from core.errors import CompoundError
from models.checkpoint import build_bundle
from optimizations.registry import get_transform
from tests.fakes import install_fakes

A, B, C = (TransformSpec(name) for name in ("a", "b", "c"))


# --- designs ----------------------------------------------------------------------------------
def names(configurations: tuple[Configuration, ...]) -> list[str]:
    return [c.name for c in configurations]


def test_singles_are_baseline_each_alone_and_the_stack():
    assert names(build_configurations((A, B, C), ["singles"])) == [
        "baseline",
        "a",
        "b",
        "c",
        "a+b+c",
    ]


def test_leave_one_out_drops_each_in_turn_and_combines_without_repeats():
    assert names(build_configurations((A, B, C), ["leave-one-out"])) == [
        "baseline",
        "a+b+c",
        "b+c",
        "a+c",
        "a+b",
    ]
    both = names(build_configurations((A, B, C), ["singles", "leave-one-out"], aa_control=True))
    assert both == ["baseline", "a", "b", "c", "a+b+c", "b+c", "a+c", "a+b", AA_CONTROL]
    assert len(set(both)) == len(both)


def test_factorial_is_every_subset_and_capped_at_six():
    assert len(build_configurations((A, B, C), ["factorial"])) == 8
    seven = tuple(TransformSpec(f"t{i}") for i in range(7))
    with pytest.raises(CompoundError, match="at most 6 transforms"):
        build_configurations(seven, ["factorial"])


def test_no_transforms_means_baseline_only_and_no_control():
    assert names(build_configurations((), ["singles"], aa_control=True)) == ["baseline"]


def test_design_and_duplicate_errors():
    assert parse_designs("singles, leave-one-out") == ("singles", "leave-one-out")
    with pytest.raises(CompoundError, match="unknown design 'pairs'"):
        parse_designs("singles,pairs")
    with pytest.raises(CompoundError, match="listed twice"):
        build_configurations((A, A), ["singles"])


# --- --transforms and --param -----------------------------------------------------------------
def test_parse_transforms_fills_defaults_and_types_values():
    specs = parse_transforms(
        "token_pruning,fused_qkv", ["token_pruning.keep_ratio=0.25", "fused_qkv.fuse_mlp=false"]
    )
    assert [s.name for s in specs] == ["token_pruning", "fused_qkv"]
    assert specs[0].params == {"layer": None, "keep_ratio": 0.25, "threshold": None}
    assert specs[1].params == {"fuse_mlp": False}


@pytest.mark.parametrize(
    ("names_text", "params", "message"),
    [
        ("warp_drive", [], "unknown transform 'warp_drive'"),
        ("fused_qkv", ["token_pruning.layer=1"], "'token_pruning' is not in --transforms"),
        ("fused_qkv", ["fuse_mlp"], "expects TRANSFORM.NAME=VALUE"),
        ("token_pruning", ["token_pruning.keep_ratio=lots"], "must be float, got str"),
        ("token_pruning", ["token_pruning.ratio=1"], "unknown parameter 'ratio'"),
    ],
)
def test_parse_transforms_errors(names_text, params, message):
    with pytest.raises(CompoundError, match=message):
        parse_transforms(names_text, params)


def test_pruning_layer_defaults_to_half_the_depth():
    tiny = build_bundle("tiny", seed=0)
    assert get_transform("token_pruning").first_layer(tiny) == len(tiny.decoder_layers) // 2


# --- preflight --------------------------------------------------------------------------------
def test_preflight_rejects_a_lying_lossless_transform_and_scores_the_rest(monkeypatch):
    install_fakes(monkeypatch)
    torch.set_num_threads(1)
    tiny = build_bundle("tiny", seed=0)
    transforms = (TransformSpec("fused_qkv"), TransformSpec("test_broken"))
    configurations = build_configurations(transforms, ["singles"])
    results = {
        r.config: r
        for r in run_preflight(tiny, configurations, WorkloadSpec(requests_per_block=4), 20)
    }
    assert results["fused_qkv"].status == "ok" and results["fused_qkv"].max_abs_logit_diff < 1e-4
    assert results["test_broken"].status == REJECTED
    assert "lossless check failed for test_broken" in results["test_broken"].reason
    # the stack holds the broken one too: rejected by the same (cached) check
    assert results["fused_qkv+test_broken"].status == REJECTED
    assert len(results["baseline"].correct) == 20 and results["baseline"].accuracy
    assert results["fused_qkv"].targets == [
        f"layers.{i}.{kind}" for i in range(2) for kind in ("attention", "mlp")
    ]


# --- the verdict on planted measurements ------------------------------------------------------
PROCESSES, PER_PROCESS = 5, 8
ROUNDS = PROCESSES * PER_PROCESS


def planted_samples(
    savings: dict[str, float],
    seed: int = 0,
    noise: float = 0.004,
    tau: float = 0.0,
    memory: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Block samples with known savings: each configuration's value is base × (1 − Δ) × noise,
    measured in PROCESSES processes (epochs) of PER_PROCESS rounds, each process of each
    configuration carrying its own offset exp(τ·z).

    Module times: baseline spends 60% in m1 and 40% in m2; "a" saves 10% in m1, "b" 20% in m2.
    Peak RSS: 400 MB minus `memory[config]` bytes, fixed per process.
    """
    rng = np.random.default_rng(seed)
    records = []
    local = {"a": {"m1": 0.10}, "b": {"m2": 0.20}}
    memory = memory or {}

    def add(config, block, metric, value, epoch, module="total", source="measured"):
        records.append(
            {
                "config": config,
                "block": block,
                "metric": metric,
                "value": value,
                "unit": "s",
                "module": module,
                "source": source,
                "extra": {"process": epoch},
            }
        )

    offsets = {
        (c, e): np.exp(tau * rng.standard_normal()) for c in savings for e in range(PROCESSES)
    }
    # each process's peak differs a little (allocator state): 0.1 MiB SD
    rss = {(c, e): 0.1 * 2**20 * rng.standard_normal() for c in savings for e in range(PROCESSES)}
    for block in range(ROUNDS):
        epoch = block // PER_PROCESS
        drift = 1 + 0.05 * np.sin(block)  # shared by all configurations in a round
        for config, saving in savings.items():
            value = (1 - saving) * drift * offsets[config, epoch]
            value *= 1 + noise * rng.standard_normal()
            for metric in ("block_seconds", "latency_mean_s", "cost_usd_per_1k"):
                add(config, block, metric, value, epoch)
            add(config, block, "energy_j", value * 30, epoch, source="estimated")
            peak = 4e8 - memory.get(config, 0.0) + rss[config, epoch]
            add(config, block, "peak_rss_bytes", peak, epoch)
            parts = config.split("+")
            m1 = 0.6 * np.prod([1 - local.get(p, {}).get("m1", 0) for p in parts])
            m2 = 0.4 * np.prod([1 - local.get(p, {}).get("m2", 0) for p in parts])
            add(config, block, "module_time_s", m1, epoch, "m1")
            add(config, block, "module_time_s", m2, epoch, "m2")
            add(config, block, "hooked_block_seconds", m1 + m2, epoch)
    return pd.DataFrame.from_records(records)


PREFLIGHT = {"a": {"targets": ["m1"]}, "b": {"targets": ["m2"]}}


def rows_by_label(verdict) -> dict:
    return {row["label"]: row for row in verdict.metrics}


def test_multiplicative_savings_compound_and_hierarchical_matches_amdahl():
    savings = {"baseline": 0.0, "a": 0.10, "b": 0.20, "a+b": 1 - 0.9 * 0.8}
    verdict = judge(planted_samples(savings), ["a", "b"], PREFLIGHT)
    rows = rows_by_label(verdict)
    assert set(rows) == {"latency"}  # estimated energy and cost restate it: no word
    latency = rows["latency"]
    assert latency["word"] == "compounds"
    assert latency["measured"]["point"] == pytest.approx(0.28, abs=0.01)
    assert latency["predicted_independent"]["point"] == pytest.approx(0.28, abs=0.01)
    assert latency["interaction_ratio"]["lo"] <= 1.0 <= latency["interaction_ratio"]["hi"]
    # 0.6 × 10% + 0.4 × 20%: every module's saving weighted by the baseline's shares
    assert latency["predicted_hierarchical"]["point"] == pytest.approx(0.14, abs=1e-9)
    assert latency["processes"] == PROCESSES
    assert {r["label"] for r in verdict.restated} == {"energy", "cost"}
    assert all("restates latency" in r["note"] for r in verdict.restated)
    assert {r["transform"] for r in verdict.leave_one_out} == {"a", "b"}
    assert verdict.family["rows"] == 1 + 2
    assert verdict.components["processes"] == PROCESSES


@pytest.mark.parametrize(
    ("stack", "word"), [(0.18, "sub-multiplicative"), (0.38, "super-multiplicative")]
)
def test_planted_interactions_get_the_right_word(stack, word):
    savings = {"baseline": 0.0, "a": 0.10, "b": 0.20, "a+b": stack}
    rows = rows_by_label(judge(planted_samples(savings), ["a", "b"], PREFLIGHT))
    assert rows["latency"]["word"] == word
    assert rows["latency"]["residual"]["point"] == pytest.approx(stack - 0.28, abs=0.01)
    ratio = (1 - stack) / (0.9 * 0.8)
    assert rows["latency"]["interaction_ratio"]["point"] == pytest.approx(ratio, abs=0.01)


def test_process_noise_makes_a_small_departure_inconclusive_not_compounds():
    """A 1.5-point departure under 3% process offsets: neither within ±2 pp nor resolved."""
    savings = {"baseline": 0.0, "a": 0.10, "b": 0.20, "a+b": 0.265}
    rows = rows_by_label(judge(planted_samples(savings, tau=0.03), ["a", "b"], PREFLIGHT))
    latency = rows["latency"]
    assert latency["word"] == "inconclusive"
    assert latency["margin_needed"] > 0.02
    assert "would have been needed" in latency["statement"]


def test_regressions_are_never_called_super_multiplicative():
    """Every single slows down; the stack slows down less than their product."""
    savings = {"baseline": 0.0, "a": -0.10, "b": -0.08, "a+b": -0.09}
    rows = rows_by_label(judge(planted_samples(savings), ["a", "b"], PREFLIGHT))
    latency = rows["latency"]
    assert latency["word"] == "singles not savings: stack cheaper than their product"
    assert "all 2 singles are regressions" in latency["statement"]
    assert "less than their product" in latency["statement"]


def test_memory_uses_an_additive_null_per_process():
    freed = {"a": 8 * 2**20, "b": 4 * 2**20}
    savings = {"baseline": 0.0, "a": 0.10, "b": 0.20, "a+b": 0.28}
    verdict = judge(
        planted_samples(savings, memory={**freed, "a+b": 12 * 2**20}), ["a", "b"], PREFLIGHT
    )
    assert verdict.memory["word"] == "additive"
    assert verdict.memory["processes"] == PROCESSES
    assert verdict.memory["predicted_bytes"]["point"] == pytest.approx(12 * 2**20, rel=0.05)
    overlap = judge(
        planted_samples(savings, memory={**freed, "a+b": 6 * 2**20}), ["a", "b"], PREFLIGHT
    )
    # 6 MiB short of the sum: beyond the margin (1% of 400 MB, 3.8 MiB) and resolved
    assert overlap.memory["word"] == "sub-additive"
    within = judge(
        planted_samples(savings, memory={**freed, "a+b": 10 * 2**20}), ["a", "b"], PREFLIGHT
    )
    assert within.memory["word"] == "additive"  # 2 MiB short: inside the practical margin


def test_a_transform_not_measured_is_left_out_with_the_reason():
    savings = {"baseline": 0.0, "a": 0.10, "b": 0.20, "a+b": 0.28}
    checks = {**PREFLIGHT, "c": {"reason": "lossless check failed for c: ..."}}
    verdict = judge(planted_samples(savings), ["a", "b", "c"], checks)
    assert verdict.transforms == ["a", "b"] and verdict.stack == "a+b"
    assert verdict.excluded == {"c": "lossless check failed for c: ..."}
    assert rows_by_label(verdict)["latency"]["word"] == "compounds"


def test_no_verdict_without_two_measured_transforms():
    verdict = judge(planted_samples({"baseline": 0.0, "a": 0.1}), ["a"], PREFLIGHT)
    assert verdict.metrics == [] and "at least two transforms" in verdict.problems[0]


# --- CLI --------------------------------------------------------------------------------------
def test_transforms_command_lists_the_paper_techniques(capsys):
    assert main(["transforms", "--json"]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)["transforms"]}
    assert {"vision_sleep", "token_pruning", "fused_qkv"} <= set(listed)
    assert listed["vision_sleep"]["lossless"] and not listed["token_pruning"]["lossless"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--transforms", "warp_drive"], "unknown transform 'warp_drive'"),
        (["--design", "pairs"], "unknown design 'pairs'"),
        (["--transforms", "none", "--param", "fused_qkv.fuse_mlp=true"], "--transforms is none"),
        (
            ["--transforms", "token_pruning", "--param", "token_pruning.layer=9"],
            "'layer' must be <",
        ),
        (["--memory-processes", "-1"], "--memory-processes must be >= 0"),
        (["--target", "0"], "--target must be > 0"),
        (["--target", "1", "--processes", "5"], "--target plans the processes and rounds"),
        (["--target", "1"], "--target needs a calibration of this machine"),
    ],
)
def test_run_flag_errors_are_one_line(tiny_cache_view, tmp_path, capsys, flags, message):
    results = tmp_path / "results"
    run = ["run", "--preset", "tiny", "--cache-dir", str(tiny_cache_view)]
    code = main(run + ["--results-dir", str(results)] + flags)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not results.exists()  # nothing written for a run that never started


def test_run_with_transforms_writes_the_verdict_and_report(tiny_cache, tmp_path, capsys):
    code = main(
        [
            "run",
            "--preset",
            "tiny",
            "--cache-dir",
            str(tiny_cache),
            "--results-dir",
            str(tmp_path),
            "--run-id",
            "suite",
            "--transforms",
            "token_pruning,fused_qkv",
            "--requests",
            "2",
            "--new-tokens",
            "2",
            "--min-rounds",
            "3",
            "--min-seconds",
            "0",
            "--threads",
            "1",
            "--processes",
            "2",
            "--eval-examples",
            "40",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    verdict = out["verdict"]
    assert verdict["transforms"] == ["token_pruning", "fused_qkv"]
    # on a CPU, estimated energy and derived cost restate latency: shown without a word
    assert [row["label"] for row in verdict["metrics"]] == ["latency"]
    assert [row["label"] for row in verdict["restated"]] == ["energy", "cost"]
    assert verdict["memory"]["label"] == "peak memory"
    stack_rows = {
        row["metric"]: row for row in out["comparisons"] if row["config"] == verdict["stack"]
    }
    for row in verdict["metrics"]:
        residual, margin = row["residual"], row["margin"]
        # the word is the one the residual's interval calls for, whatever this machine measured
        singles_saved = all(s["lo"] > 0 for s in row["singles"].values())
        if -margin < residual["lo"] and residual["hi"] < margin:
            expected = "compounds" if singles_saved else "stack matches"
        elif residual["hi"] < 0:
            expected = "sub-multiplicative" if singles_saved else "stack dearer"
        elif residual["lo"] > 0:
            expected = "super-multiplicative" if singles_saved else "stack cheaper"
        else:
            expected = "inconclusive"
        assert expected in row["word"], row
        assert row["aa_control"] is not None
        # one estimator: the verdict's measured stack is comparisons.csv's stack row
        compared = stack_rows[row["metric"]]
        assert (row["measured"]["point"], row["measured"]["lo"], row["measured"]["hi"]) == (
            compared["delta"],
            compared["lo"],
            compared["hi"],
        )
    assert verdict["accuracy"]["n_examples"] == 40
    run_dir = tmp_path / "suite"
    report = (run_dir / "report.md").read_text()
    assert "## Verdict" in report and "token_pruning + fused_qkv" in report
    assert json.loads((run_dir / "verdict.json").read_text()) == verdict
    pruned = [s for s in out["summary"] if s["metric"] == "pruning_kept_fraction"]
    assert pruned and all(s["median"] == pytest.approx(0.5) for s in pruned)


def test_transforms_report_figures_the_harness_times_and_stores():
    from bench.measure.trackers.events import EventTracker
    from bench.measure.workload import build_requests
    from models.generation import generate
    from optimizations.registry import apply_transforms

    torch.set_num_threads(1)
    tiny = build_bundle("tiny", seed=0)
    specs = (TransformSpec("vision_sleep"), TransformSpec("token_pruning"))
    transformed = apply_transforms(tiny, specs)
    applied = {entry["name"]: entry["figures"] for entry in transformed.metadata["transforms"]}
    # known at apply time, declared by the transform; cpu-copy frees nothing
    assert applied == {
        "vision_sleep": [
            {
                "metric": "sleep_bytes_freed",
                "value": 0.0,
                "unit": "bytes",
                "module": "vision_encoder",
            }
        ],
        "token_pruning": [],
    }
    transformed.events.listener = tracker = EventTracker("cpu")
    requests = build_requests(transformed, WorkloadSpec(requests_per_block=4, image_fraction=0.5))
    for request in requests:
        generate(transformed, request, 2)
    images = sum(r.pixel_values is not None for r in requests)
    samples = tracker.samples("stack", 0, 0.0, 1.0)
    wakes = [s for s in samples if s.metric == "sleep_wake_s"]
    kept = [s for s in samples if s.metric == "pruning_kept_fraction"]
    assert len(wakes) == images == len(kept)
    assert all(s.value > 0 and s.unit == "s" for s in wakes)
    assert all(s.value == pytest.approx(0.5) for s in kept)


def test_a_resumed_run_checks_only_the_configurations_not_yet_checked(tiny_cache, tmp_path):
    from bench.configuration import ModelSource, Protocol, RunSpec
    from bench.store import RunStore
    from bench.suite import Suite, check

    configurations = build_configurations((TransformSpec("fused_qkv"),), ["singles"])
    spec = RunSpec(
        ModelSource(preset="tiny", cache_dir=str(tiny_cache)),
        configurations,
        WorkloadSpec(requests_per_block=2, new_tokens=2),
        Protocol(eval_examples=10),
    )
    store = RunStore.create(tmp_path, spec.to_dict(), {}, "resumed")
    store.record_extra("preflight", {"config": "baseline", "status": "ok", "stored": "before"})
    check(Suite(store, spec))
    records = store.extras("preflight")
    assert [r["config"] for r in records] == ["baseline", "fused_qkv"]
    assert records[0]["stored"] == "before" and len(records[1]["correct"]) == 10
