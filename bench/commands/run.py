"""`compound run`: the main job. Train the teacher if needed, evaluate it, measure the suite.

Results land in results/<run-id>/: run.json (configuration, environment, accuracy), samples.jsonl
(raw, appended per block), summary.csv, module_shares.csv and comparisons.csv. A killed run
continues with `compound run --resume <run-id>`, losing no finished block and repeating none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bench import analysis
from bench.commands.common import (
    add_json_arg,
    add_model_args,
    fraction,
    positive_int,
    print_json,
    resolve_device,
)
from bench.configuration import Configuration, ModelSource, Protocol, RunSpec
from bench.environment import collect_environment
from bench.errors import CompoundError
from bench.report import render_run
from bench.runner import run_rounds
from bench.store import RunStore, load_run
from bench.worker import load_bundle
from bench.workload import WorkloadSpec
from models.checkpoint import cache_dir
from models.evaluate import evaluate
from models.presets import DEFAULT_PRESET, get_preset
from models.teacher import ensure_trained

DEFAULT_RESULTS = Path("results")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the benchmark suite (the main job)")
    add_model_args(parser)
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


def configurations(args: argparse.Namespace) -> tuple[Configuration, ...]:
    """The configurations the suite measures (the baseline; transforms arrive with the registry)."""
    return (Configuration("baseline"),)


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
    protocol = Protocol(
        min_rounds=args.min_rounds,
        min_seconds=args.min_seconds,
        max_seconds=args.budget,
        threads=args.threads or torch.get_num_threads(),
        seed=args.seed,
        watts_per_core=args.watts_per_core,
        price_per_device_hour=args.price_per_hour,
        grid_g_per_kwh=args.grid_intensity,
    )
    workload = WorkloadSpec(
        requests_per_block=args.requests,
        image_fraction=args.image_fraction,
        new_tokens=args.new_tokens,
        seed=args.seed,
    )
    return RunSpec(source, configurations(args), workload, protocol)


def prepare_model(spec: RunSpec, show_progress: bool) -> dict[str, Any]:
    """Train the teacher if the cache lacks it, then score it on the test split."""
    source = spec.source
    cost_only = bool(source.preset) and get_preset(str(source.preset)).cost_only
    trained_now = False
    if source.preset and not cost_only:
        _, trained_now = ensure_trained(
            source.preset, Path(str(source.cache_dir)), show_progress=show_progress
        )
    bundle = load_bundle(source)
    info: dict[str, Any] = {"model": bundle.describe(), "trained_now": trained_now}
    if bundle.trained and not cost_only:
        result = evaluate(bundle, split="test", count=400)
        info["accuracy"] = result.accuracy
        info["accuracy_by_kind"] = result.by_kind
    return info


def analyse(store: RunStore) -> dict[str, Any]:
    """Recompute every table from the stored samples and write them next to them."""
    loaded = load_run(store.path)
    samples = loaded.samples
    summary = analysis.summary_table(samples)
    shares = analysis.module_shares(samples)
    baseline = store.config["configurations"][0]["name"]
    compared = analysis.comparisons(samples, baseline, seed=store.config["protocol"]["seed"])
    store.write_summary(summary)
    store.write_text("module_shares.csv", shares.to_csv(index=False))
    store.write_text("comparisons.csv", compared.to_csv(index=False))
    return {
        "summary": summary,
        "shares": shares,
        "comparisons": compared,
        "flags": analysis.flags(samples, summary),
        "failures": loaded.failures,
    }


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, quiet=args.json or args.no_progress)
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
    if store is None or "model" not in store.meta:
        info = prepare_model(spec, show_progress=not (args.json or args.no_progress))
        if store is None:
            store = RunStore.create(
                results_dir,
                spec.to_dict(),
                collect_environment(torch.device(spec.source.device), spec.protocol.seed),
                args.run_id,
            )
        for key, value in info.items():
            store.update_meta(key, value)
    store.set_state("running")
    console.print(
        f"run {store.run_id}: {len(spec.configurations)} configuration(s), results in {store.path}"
    )
    try:
        with console.status("measuring") as status:
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
    tables = analyse(store)
    store.set_state("complete")
    meta = store.meta
    if args.json:
        print_json(_json_report(store, meta, tables))
    else:
        Console().print(render_run(meta, tables))
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
        "flags": tables["flags"],
        "failures": tables["failures"].to_dict(orient="records"),
    }
