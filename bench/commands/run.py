"""`compound run`: the main job. Train the teacher if needed, check and score every
configuration, measure the suite, and judge whether the savings compound.

Results land in results/<run-id>/: run.json (configuration, environment, accuracy), samples.jsonl
(raw, appended per block, with the preflight records), summary.csv, module_shares.csv,
comparisons.csv, verdict.json and report.md. A killed run continues with
`compound run --resume <run-id>`, losing no finished block and repeating none.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bench.commands.common import (
    add_json_arg,
    add_model_args,
    fraction,
    json_text,
    parse_transforms,
    positive_int,
    print_json,
    resolve_device,
)
from bench.configuration import ModelSource, Protocol, RunSpec, TransformSpec
from bench.designs import BASELINE, DESIGNS, build_configurations, parse_designs
from bench.judge import analysis
from bench.judge.suite_verdict import judge
from bench.measure.environment import collect_environment
from bench.measure.preflight import REJECTED, run_preflight, unmet_requirements
from bench.measure.runner import run_rounds
from bench.measure.worker import load_bundle
from bench.measure.workload import WorkloadSpec
from bench.report.markdown import markdown_report
from bench.report.terminal import render_run
from bench.store import RunStore, load_run
from core.errors import CompoundError
from models.bundle import ModelBundle
from models.checkpoint import cache_dir
from models.presets import DEFAULT_PRESET, get_preset
from models.teacher import ensure_trained

DEFAULT_RESULTS = Path("results")
DEFAULT_TRANSFORMS = "vision_sleep,token_pruning,fused_qkv"
DEFAULT_DESIGNS = "singles,leave-one-out"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the benchmark suite (the main job)")
    add_model_args(parser)
    parser.add_argument(
        "--transforms",
        default=DEFAULT_TRANSFORMS,
        metavar="A,B,...",
        help=f"transforms in stacking order, or 'none' (default {DEFAULT_TRANSFORMS}; "
        "see `compound transforms`)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="T.NAME=VALUE",
        help="a transform parameter, e.g. token_pruning.keep_ratio=0.25 (repeatable)",
    )
    parser.add_argument(
        "--design",
        default=DEFAULT_DESIGNS,
        metavar="D,...",
        help=f"{', '.join(DESIGNS)}; comma-separated (default {DEFAULT_DESIGNS})",
    )
    parser.add_argument(
        "--no-aa-control",
        action="store_true",
        help="skip the A/A control (a second baseline process that measures process noise)",
    )
    parser.add_argument(
        "--eval-examples",
        type=int,
        default=2000,
        metavar="N",
        help="held-out examples scored per configuration, half image (default 2000; 0: none)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where to run (auto: cuda when available)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads per worker (default: all cores)",
    )
    parser.add_argument("--requests", type=positive_int, default=8, help="requests per block")
    parser.add_argument(
        "--image-fraction",
        type=fraction,
        default=0.5,
        help="share of image requests in the workload (default 0.5)",
    )
    parser.add_argument(
        "--new-tokens",
        type=positive_int,
        default=8,
        help="tokens generated per request (fixed work)",
    )
    parser.add_argument("--min-rounds", type=positive_int, default=10)
    parser.add_argument(
        "--min-seconds", type=float, default=20.0, help="minimum timed seconds per configuration"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop the timed rounds after this many seconds even if minima are unmet",
    )
    parser.add_argument(
        "--watts-per-core",
        type=float,
        default=7.5,
        help="CPU energy estimate when no RAPL/NVML counter is readable",
    )
    parser.add_argument(
        "--price-per-hour",
        type=float,
        default=0.10,
        help="$ per device-hour for the derived cost figure",
    )
    parser.add_argument(
        "--grid-intensity",
        type=float,
        default=475.0,
        help="gCO2 per kWh for the derived carbon figure",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--run-id", default=None, help="name the run (default: time-based)")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="RUN_ID",
        help="continue a killed run; its stored configuration is reused",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def suite_transforms(args: argparse.Namespace) -> tuple[TransformSpec, ...]:
    if args.transforms.strip().lower() in ("", "none"):
        if args.param:
            raise CompoundError("--param given, but --transforms is none")
        return ()
    return parse_transforms(args.transforms, args.param)


def build_spec(args: argparse.Namespace) -> RunSpec:
    cache = str(cache_dir(args.cache_dir))
    device = resolve_device(args.device)
    if args.model is not None:
        model_path = str(args.model.expanduser().resolve())
        source = ModelSource(model_path=model_path, cache_dir=cache, device=device)
    else:
        preset = get_preset(args.preset or DEFAULT_PRESET).name
        source = ModelSource(preset=preset, cache_dir=cache, device=device)
    if args.min_seconds < 0 or (args.budget is not None and args.budget <= 0):
        raise CompoundError("--min-seconds must be >= 0 and --budget > 0")
    if args.eval_examples < 0:
        raise CompoundError(f"--eval-examples must be >= 0, got {args.eval_examples}")
    protocol = Protocol(
        min_rounds=args.min_rounds,
        min_seconds=args.min_seconds,
        max_seconds=args.budget,
        threads=args.threads or torch.get_num_threads(),
        seed=args.seed,
        watts_per_core=args.watts_per_core,
        price_per_device_hour=args.price_per_hour,
        grid_g_per_kwh=args.grid_intensity,
        eval_examples=args.eval_examples,
    )
    workload = WorkloadSpec(
        requests_per_block=args.requests,
        image_fraction=args.image_fraction,
        new_tokens=args.new_tokens,
        seed=args.seed,
    )
    transforms = suite_transforms(args)
    designs = parse_designs(args.design)
    aa_control = not args.no_aa_control
    configurations = build_configurations(transforms, designs, aa_control)
    return RunSpec(source, configurations, workload, protocol, transforms, designs, aa_control)


def drop_unrunnable(spec: RunSpec, bundle: ModelBundle) -> tuple[RunSpec, dict[str, str]]:
    """Leave out transforms whose requirements this machine cannot meet, saying why."""
    skipped = unmet_requirements(spec.transforms, bundle)
    if not skipped:
        return spec, {}
    kept = tuple(t for t in spec.transforms if t.name not in skipped)
    configurations = build_configurations(kept, spec.designs, spec.aa_control)
    return replace(spec, transforms=kept, configurations=configurations), skipped


def prepare_model(spec: RunSpec, show_progress: bool) -> tuple[dict[str, Any], ModelBundle]:
    """Train the teacher if the cache lacks it; the loaded baseline and what describes it."""
    source = spec.source
    cost_only = bool(source.preset) and get_preset(str(source.preset)).cost_only
    trained_now = False
    if source.preset and not cost_only:
        _, trained_now = ensure_trained(
            source.preset, Path(str(source.cache_dir)), show_progress=show_progress
        )
    bundle = load_bundle(source)
    return {"model": bundle.describe(), "trained_now": trained_now}, bundle


def preflight(
    store: RunStore, spec: RunSpec, bundle: ModelBundle | None, say: Callable[[str], None]
) -> None:
    """Check and score the configurations not yet checked (all of them, unless resuming)."""
    done = {record["config"] for record in store.extras("preflight")}
    todo = [c for c in spec.configurations if c.name not in done]
    if not todo:
        return
    bundle = bundle or load_bundle(spec.source)
    # Random weights: nothing to score.
    count = spec.protocol.eval_examples if bundle.trained else 0
    for result in run_preflight(bundle, todo, spec.workload, count, say):
        store.record_extra("preflight", result.to_dict())
        if result.status == REJECTED:
            store.record_failure(result.config, f"rejected: {result.reason}")
        if result.config == BASELINE and result.accuracy:
            store.update_meta("accuracy", result.accuracy)
            store.update_meta("accuracy_by_kind", result.accuracy_by_kind)


def analyse(store: RunStore, spec: RunSpec) -> dict[str, Any]:
    """Recompute every table and the verdict from the stored records; write them beside them."""
    loaded = load_run(store.path)
    samples = loaded.samples
    seed = spec.protocol.seed
    summary = analysis.summary_table(samples)
    shares = analysis.module_shares(samples)
    compared = analysis.comparisons(samples, BASELINE, seed=seed)
    checks = {r["config"]: r for r in loaded.extras if r["kind"] == "preflight"}
    verdict = judge(samples, [t.name for t in spec.transforms], checks, seed=seed).to_dict()
    tables = {
        "summary": summary,
        "shares": shares,
        "comparisons": compared,
        "flags": analysis.flags(samples, summary),
        "failures": loaded.failures,
        "verdict": verdict,
    }
    store.write_summary(summary)
    store.write_text("module_shares.csv", shares.to_csv(index=False))
    store.write_text("comparisons.csv", compared.to_csv(index=False))
    store.write_text("verdict.json", json_text(verdict))
    store.write_text("report.md", markdown_report(store.meta, tables, verdict))
    return tables


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, quiet=args.json or args.no_progress)
    show_progress = not (args.json or args.no_progress)
    results_dir = args.results_dir
    if args.resume:
        if args.preset or args.model or args.run_id:
            raise CompoundError(
                "--resume reuses the stored run's configuration; drop "
                "--preset, --model and --run-id"
            )
        store = RunStore.open(results_dir, args.resume)
        spec = RunSpec.from_dict(store.config)
        console.print(
            f"resuming run {store.run_id} ({len(store.completed_blocks())} blocks stored)"
        )
    else:
        spec = build_spec(args)
        store = None
    bundle = None
    if store is None or "model" not in store.meta:
        info, bundle = prepare_model(spec, show_progress=show_progress)
        if store is None:
            spec, skipped = drop_unrunnable(spec, bundle)
            for name, reason in skipped.items():
                console.print(f"skipping transform {name}: {reason}")
            store = RunStore.create(
                results_dir,
                spec.to_dict(),
                collect_environment(torch.device(spec.source.device), spec.protocol.seed),
                args.run_id,
            )
            store.update_meta("skipped_transforms", skipped)
        for key, value in info.items():
            store.update_meta(key, value)
    store.set_state("running")
    console.print(
        f"run {store.run_id}: {len(spec.configurations)} configuration(s), results in {store.path}"
    )
    try:
        with console.status("checking") as status:
            preflight(store, spec, bundle, lambda m: status.update(m))
            del bundle  # the workers load their own copies
            outcome = run_rounds(spec, store, progress=lambda m: status.update(f"measuring: {m}"))
    except KeyboardInterrupt:
        store.set_state("interrupted")
        print(
            f"compound: interrupted; continue with `compound run --resume {store.run_id}`",
            file=sys.stderr,
        )
        return 130
    store.update_meta("rounds", outcome.rounds)
    store.update_meta("stopped_by_budget", outcome.stopped_by_budget)
    tables = analyse(store, spec)
    store.set_state("complete")
    meta = store.meta
    if args.json:
        print_json(_json_report(store, meta, tables))
    else:
        Console().print(render_run(meta, tables))
        console.print(f"report: {store.path / 'report.md'}")
    return 0 if not outcome.failed else 1


def _json_report(store: RunStore, meta: dict[str, Any], tables: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": store.run_id,
        "path": str(store.path),
        "model": meta.get("model"),
        "accuracy": meta.get("accuracy"),
        "rounds": meta.get("rounds"),
        "summary": tables["summary"].to_dict(orient="records"),
        "module_shares": tables["shares"].to_dict(orient="records"),
        "comparisons": tables["comparisons"].to_dict(orient="records"),
        "verdict": tables["verdict"],
        "flags": tables["flags"],
        "failures": tables["failures"].to_dict(orient="records"),
    }
