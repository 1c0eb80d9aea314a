"""`compound run`: the main job. Parse the flags, run the suite (`bench.suite`), print the result.

Results land in results/<run-id>/ (see `bench.suite`); a killed run continues with
`compound run --resume <run-id>`, losing no finished block and repeating none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console

from bench import suite
from bench.commands.common import (
    add_json_arg,
    add_model_args,
    fraction,
    parse_transforms,
    positive_int,
    print_json,
)
from bench.configuration import Protocol, RunSpec, WorkloadSpec
from bench.designs import DESIGNS, parse_designs
from bench.report.terminal import render_run
from core.errors import CompoundError

DEFAULT_RESULTS = Path("results")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the benchmark suite (the main job)")
    add_model_args(parser)
    transforms = ",".join(suite.DEFAULT_TRANSFORMS)
    designs = ",".join(suite.DEFAULT_DESIGNS)
    parser.add_argument(
        "--transforms",
        default=transforms,
        metavar="A,B,...",
        help=f"transforms in stacking order, or 'none' (default {transforms}; "
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
        default=designs,
        metavar="D,...",
        help=f"{', '.join(DESIGNS)}; comma-separated (default {designs})",
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
    for flag, default, help_text in (
        ("--min-seconds", 20.0, "minimum timed seconds per configuration"),
        ("--watts-per-core", 7.5, "CPU energy estimate when no RAPL/NVML counter is readable"),
        ("--price-per-hour", 0.10, "$ per device-hour for the derived cost figure"),
        ("--grid-intensity", 475.0, "gCO2 per kWh for the derived carbon figure"),
    ):
        parser.add_argument(flag, type=float, default=default, help=f"{help_text} ({default:g})")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop the timed rounds after this many seconds even if minima are unmet",
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


def build_spec(args: argparse.Namespace) -> RunSpec:
    """The suite the flags describe (everything checked before any work starts)."""
    if args.min_seconds < 0 or (args.budget is not None and args.budget <= 0):
        raise CompoundError("--min-seconds must be >= 0 and --budget > 0")
    if args.eval_examples < 0:
        raise CompoundError(f"--eval-examples must be >= 0, got {args.eval_examples}")
    source = suite.model_source(
        args.preset, args.model, args.cache_dir, args.device, trained=args.trained
    )
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
    transforms = parse_transforms(args.transforms, args.param)
    designs = parse_designs(args.design)
    return suite.plan(
        source, transforms, designs, workload, protocol, aa_control=not args.no_aa_control
    )


def run(args: argparse.Namespace) -> int:
    quiet = args.json or args.no_progress
    console = Console(stderr=True, quiet=quiet)
    if args.resume:
        if args.preset or args.model or args.run_id:
            raise CompoundError(
                "--resume reuses the stored run's configuration; drop "
                "--preset, --model and --run-id"
            )
        current = suite.resume(args.results_dir, args.resume, show_progress=not quiet)
        stored = len(current.store.completed_blocks())
        console.print(f"resuming run {current.store.run_id} ({stored} blocks stored)")
    else:
        current = suite.start(
            build_spec(args),
            args.results_dir,
            args.run_id,
            show_progress=not quiet,
            say=console.print,
        )
    store = current.store
    console.print(
        f"run {store.run_id}: {len(current.spec.configurations)} configuration(s), "
        f"results in {store.path}"
    )
    with console.status("checking") as status:
        outcome = suite.measure(current, say=status.update)
    tables = suite.analyse(store, current.spec)
    if args.json:
        print_json(suite.json_report(store, tables))
    else:
        Console().print(render_run(store.meta, tables))
        console.print(f"report: {store.path / 'report.md'}")
    return 0 if not outcome.failed else 1
