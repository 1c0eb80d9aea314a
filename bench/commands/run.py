"""`compound run`: the main job. Parse the flags, run the suite (`bench.suite`), print the result.

Results land in results/<run-id>/ (see `bench.suite`); a killed run continues with
`compound run --resume <run-id>`, losing no finished block and repeating none.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from bench import suite
from bench.calibration import load_calibration
from bench.commands.common import (
    HOURS,
    SEED,
    Bound,
    add_json_arg,
    add_model_args,
    add_no_limits_arg,
    add_serving_args,
    check_bounds,
    finite_float,
    fraction,
    parse_transforms,
    path_arg,
    positive_int,
    print_json,
    serving_for,
)
from bench.configuration import PLACEMENTS, START_METHODS, Protocol, RunSpec, WorkloadSpec
from bench.designs import DESIGNS, parse_designs
from bench.judge.planning import run_plan
from bench.report.terminal import render_run
from bench.store import RUN_JSON, check_run_id, live_writer
from core.errors import CompoundError
from core.paths import directory_problem

DEFAULT_RESULTS = Path("results")
BOUNDS: dict[str, Bound] = {
    "threads": Bound(low=1, high=1024),
    "requests": Bound(low=1, cap=256, why=HOURS),
    "batch_size": Bound(low=1, cap=512, why=HOURS),
    "new_tokens": Bound(low=1, cap=512, why=HOURS),
    "min_rounds": Bound(low=1, cap=10_000, why=HOURS),
    "min_seconds": Bound(low=0, cap=3600, why=HOURS),
    "processes": Bound(low=1, cap=200, why=HOURS),
    "max_alive": Bound(low=0, high=1000),
    "margin": Bound(low=0, low_open=True, high=100, why="percentage points of saving"),
    "memory_margin_mib": Bound(low=0, high=1_000_000, why="MiB"),
    "memory_margin_pct": Bound(low=0, high=100, why="percent of the baseline's memory"),
    "budget": Bound(low=0, low_open=True, cap=6 * 3600, why=HOURS),
    "eval_examples": Bound(low=0, cap=20_000, why=HOURS),
    "watts_per_core": Bound(low=0, low_open=True, high=1000, why="no CPU core draws a kilowatt"),
    "price_per_hour": Bound(low=0, high=10_000, why="dollars per device-hour"),
    "grid_intensity": Bound(low=0, high=2000, why="coal-fired power emits about 1,000 gCO2/kWh"),
    "seed": SEED,
    "memory_processes": Bound(low=0, cap=20, why=HOURS),
    "target": Bound(low=0, low_open=True, high=100, why="percentage points of saving"),
}
# What --resume may be given with; any other flag would change the stored run.
RESUME_FLAGS = {"resume", "repair", "results_dir", "json", "no_progress"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the benchmark suite (the main job)")
    add_model_args(parser)
    transforms = ",".join(suite.DEFAULT_TRANSFORMS)
    designs = ",".join(suite.DEFAULT_DESIGNS)
    parser.add_argument(
        "--transforms",
        default=transforms,
        metavar="A,B,...",
        help=f"transforms in stacking order, or 'none' (default: the --suite's, {transforms}; "
        "see `compound transforms`)",
    )
    parser.add_argument(
        "--suite",
        choices=tuple(suite.SUITES),
        default="default",
        help="a named transform list: default ("
        + ", ".join(suite.DEFAULT_TRANSFORMS)
        + ") or systems ("
        + ", ".join(suite.SUITES["systems"])
        + "); --transforms names them instead",
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
        "--train-students",
        action="store_true",
        help="train what a transform needs and the cache lacks (distill's student, "
        "sparse_finetune's weights, gated_attention_pruning's gates) instead of "
        "stopping to say how to make it",
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
    add_serving_args(parser)
    parser.add_argument(
        "--image-fraction",
        type=fraction,
        default=0.5,
        help="share of image requests in the workload (default 0.5)",
    )
    parser.add_argument(
        "--image-reuse",
        type=fraction,
        default=0.0,
        metavar="FRACTION",
        help="share of image requests that repeat an earlier request's image, each with its "
        "own question (default 0; what a vision cache can hit)",
    )
    parser.add_argument(
        "--new-tokens",
        type=positive_int,
        default=8,
        help="tokens generated per request (fixed work)",
    )
    parser.add_argument("--min-rounds", type=positive_int, default=10)
    parser.add_argument(
        "--processes",
        type=positive_int,
        default=suite.DEFAULT_PROCESSES,
        metavar="P",
        help="worker processes per configuration, one after another; every interval includes "
        f"the variance between processes (default {suite.DEFAULT_PROCESSES}; 1: rounds only)",
    )
    parser.add_argument(
        "--max-alive",
        type=int,
        default=0,
        metavar="K",
        help="worker processes alive at once; an epoch then runs its configurations in groups "
        "of K (default 0: one per configuration, lowered by the memory plan when they do not "
        "fit)",
    )
    parser.add_argument(
        "--start-method",
        choices=START_METHODS,
        default="forkserver",
        help="how worker processes start: forkserver (forked from a server that imported torch "
        "once; the default) or spawn (a fresh interpreter each)",
    )
    parser.add_argument(
        "--placement",
        choices=(suite.AUTO, *PLACEMENTS),
        default=suite.AUTO,
        help="isolated: one configuration per worker process; coresident: one process holds "
        "every configuration and rotates among them each round (narrower intervals per "
        "minute; peak memory then comes from a short isolated pass, and a crash takes the "
        "process's other configurations with it, which restart); auto (default): coresident "
        "unless a transform or the engine compiles",
    )
    parser.add_argument(
        "--memory-processes",
        type=int,
        default=3,
        metavar="N",
        help="co-resident runs: isolated processes per configuration for peak memory, one "
        "block each, before the timed rounds (default 3; 0: peak memory unmeasured)",
    )
    parser.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="look at the latency residual after half, three quarters and all processes, and "
        "stop once it is decisive against --margin, with alpha spending keeping the error "
        "rate at 5%% (default on)",
    )
    parser.add_argument(
        "--target",
        type=finite_float,
        default=None,
        metavar="PP",
        help="plan processes and rounds so the residual's 95%% interval is about ±PP "
        "percentage points, from this machine's stored `compound calibrate`; says how long "
        "the run will take before it starts",
    )
    parser.add_argument(
        "--margin",
        type=finite_float,
        default=2.0,
        metavar="PP",
        help="equivalence margin in percentage points: 'compounds' only when the residual's "
        "interval lies within ±PP (default 2; fixed before the run)",
    )
    parser.add_argument(
        "--memory-margin-mib",
        type=finite_float,
        default=1.0,
        metavar="MIB",
        help="memory savings 'add up' only within ±MIB and ±--memory-margin-pct (default 1)",
    )
    parser.add_argument(
        "--memory-margin-pct",
        type=finite_float,
        default=1.0,
        metavar="PCT",
        help="memory margin as a percent of the baseline's peak (default 1)",
    )
    for flag, default, help_text in (
        ("--min-seconds", 30.0, "minimum timed seconds per configuration, over its processes"),
        ("--watts-per-core", 7.5, "CPU energy estimate when no RAPL/NVML counter is readable"),
        ("--price-per-hour", 0.10, "$ per device-hour for the derived cost figure"),
        ("--grid-intensity", 475.0, "gCO2 per kWh for the derived carbon figure"),
    ):
        parser.add_argument(
            flag, type=finite_float, default=default, help=f"{help_text} ({default:g})"
        )
    parser.add_argument(
        "--budget",
        type=finite_float,
        default=None,
        metavar="SECONDS",
        help="stop the timed rounds after this many seconds even if minima are unmet",
    )
    parser.add_argument("--seed", type=int, default=0, help="workload and round-order seed (0)")
    parser.add_argument("--results-dir", type=path_arg, default=DEFAULT_RESULTS)
    parser.add_argument("--run-id", default=None, help="name the run (default: time-based)")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="RUN_ID",
        help="continue a killed run; its stored configuration is reused",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="with --resume: drop damaged lines of samples.jsonl (a backup is kept) and re-run "
        "the blocks they belonged to",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    add_no_limits_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def check_output(args: argparse.Namespace) -> None:
    """The results directory and run id, checked before any model is loaded or trained."""
    problem = directory_problem(args.results_dir, writable=True)
    if problem:
        raise CompoundError(f"--results-dir {problem}")
    if args.run_id is not None:
        check_run_id(args.run_id)
        target = args.results_dir / args.run_id
        if (target / RUN_JSON).exists():
            writer = live_writer(target)
            if writer:
                raise CompoundError(
                    f"run {args.run_id!r} in {args.results_dir} is being written by {writer} "
                    "(still running); wait for it or pick another --run-id"
                )
            raise CompoundError(
                f"run {args.run_id!r} already exists in {args.results_dir}; continue it with "
                f"--resume {args.run_id} or pick another --run-id"
            )
        if target.is_symlink() or (target.exists() and not _empty_directory(target)):
            raise CompoundError(
                f"{target} already exists and is not a compound-bench run; pick another --run-id"
            )


def _empty_directory(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_resume(args: argparse.Namespace) -> None:
    """--resume continues the stored run as configured: flags that would change it are refused."""
    if args.resume is None:
        if args.repair:
            raise CompoundError("--repair goes with --resume RUN_ID")
        return
    check_run_id(args.resume)
    conflicting = sorted(args.given - RESUME_FLAGS)
    if conflicting:
        flags = ", ".join("--" + dest.replace("_", "-") for dest in conflicting)
        raise CompoundError(
            f"--resume continues run {args.resume!r} as it was configured; drop {flags}"
        )


def build_spec(args: argparse.Namespace) -> RunSpec:
    """The suite the flags describe (everything checked before any work starts)."""
    check_bounds(args, BOUNDS)
    check_output(args)
    source = suite.model_source(
        args.preset, args.model, args.cache_dir, args.device, trained=args.trained
    )
    dtype, serving = serving_for(args, source.device)
    source = replace(source, dtype=dtype)
    if {"suite", "transforms"} <= args.given:
        raise CompoundError("--suite and --transforms both choose the transforms; give one")
    named = args.transforms if "transforms" in args.given else ",".join(suite.SUITES[args.suite])
    transforms = parse_transforms(named, args.param)
    designs = parse_designs(args.design)
    placement, args.placement_why = suite.resolve_placement(
        args.placement, transforms, serving.engine
    )
    protocol = Protocol(
        min_rounds=args.min_rounds,
        min_seconds=args.min_seconds,
        processes=args.processes,
        max_alive=args.max_alive,
        start_method=args.start_method,
        min_block_seconds=1.0 if source.device.startswith("cuda") else 0.0,
        max_seconds=args.budget,
        threads=args.threads or torch.get_num_threads(),
        seed=args.seed,
        watts_per_core=args.watts_per_core,
        price_per_device_hour=args.price_per_hour,
        grid_g_per_kwh=args.grid_intensity,
        eval_examples=args.eval_examples,
        margin=args.margin / 100,
        memory_margin_mib=args.memory_margin_mib,
        memory_margin_fraction=args.memory_margin_pct / 100,
        placement=placement,
        memory_processes=args.memory_processes,
        sequential=args.sequential,
    )
    workload = WorkloadSpec(
        requests_per_block=args.requests,
        image_fraction=args.image_fraction,
        image_reuse=args.image_reuse,
        new_tokens=args.new_tokens,
        seed=args.seed,
    )
    spec = suite.plan(
        source,
        transforms,
        designs,
        workload,
        protocol,
        aa_control=not args.no_aa_control,
        serving=serving,
    )
    return planned(spec, args) if args.target is not None else spec


def planned(spec: RunSpec, args: argparse.Namespace) -> RunSpec:
    """The spec with processes and rounds from this machine's stored calibration, so the
    residual's interval is about ±--target pp; the plan is kept for the start to print."""
    chosen = {"processes", "min_rounds", "min_seconds", "budget"} & args.given
    if chosen:
        flags = ", ".join("--" + c.replace("_", "-") for c in sorted(chosen))
        raise CompoundError(f"--target plans the processes and rounds itself; drop {flags}")
    calibration = load_calibration(spec.source)
    requests = calibration["requests_per_block"]
    if "requests" in args.given and args.requests != requests:
        raise CompoundError(
            f"--target plans from a calibration at {requests} requests per block; drop "
            f"--requests or run `compound calibrate --requests {args.requests}`"
        )
    protocol = spec.protocol
    plan = run_plan(
        calibration,
        len(spec.configurations),
        len(spec.transforms),
        args.target / 100,
        sequential=protocol.sequential,
        memory_processes=protocol.memory_processes if protocol.placement == "coresident" else 0,
    )
    if plan["processes"] is None:
        raise CompoundError(
            f"no run of at most 200 processes reaches ±{args.target:g} pp on this machine "
            "(its process offset τ alone is wider); ask for a larger --target"
        )
    args.plan = plan
    protocol = replace(
        protocol,
        processes=plan["processes"],
        min_rounds=plan["processes"] * plan["rounds_per_process"],
        min_seconds=0.0,
    )
    workload = replace(spec.workload, requests_per_block=requests)
    return replace(spec, protocol=protocol, workload=workload)


def run(args: argparse.Namespace) -> int:
    quiet = args.json or args.no_progress
    console = Console(stderr=True, quiet=quiet)
    check_resume(args)
    if args.resume is not None:
        current = suite.resume(
            args.results_dir, args.resume, show_progress=not quiet, repair=args.repair
        )
        stored = len(current.store.completed_blocks())
        if current.repaired:
            fixed = current.repaired
            console.print(
                f"repaired samples.jsonl: dropped {fixed['lines_dropped']} line(s) and "
                f"{fixed['blocks_dropped']} block(s) to re-run; the original is {fixed['backup']}"
            )
        console.print(f"resuming run {current.store.run_id} ({stored} blocks stored)")
    else:
        spec = build_spec(args)
        if getattr(args, "plan", None):
            plan = args.plan
            console.print(
                f"plan for ±{args.target:g} pp: {plan['processes']} processes × "
                f"{plan['rounds_per_process']} rounds, about {plan['seconds'] / 60:.1f} min of "
                f"rounds + {plan['memory_pass_s'] / 60:.1f} min memory pass, expected "
                f"±{plan['expected']:.2%} ({plan['how']})"
            )
        current = suite.start(
            spec,
            args.results_dir,
            args.run_id,
            show_progress=not quiet,
            say=console.print,
            prepare_transforms=args.train_students,
        )
    if args.resume is None:
        current.store.update_meta(
            "placement", [current.spec.protocol.placement, args.placement_why]
        )
        current.store.update_meta("target_plan", getattr(args, "plan", None))
    with current.store:  # the run's lock is released however the run ends
        return _measure_and_report(args, current, console)


def _measure_and_report(args: argparse.Namespace, current: suite.Suite, console: Console) -> int:
    store = current.store
    console.print(
        f"run {store.run_id}: {len(current.spec.configurations)} configuration(s), "
        f"{current.spec.protocol.placement} ({store.meta.get('placement', ['', 'stored'])[1]}), "
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
    if outcome.failed and len(outcome.failed) == len(current.spec.configurations):
        raise CompoundError(
            f"every configuration failed; the reasons are in {store.path / 'report.md'} and "
            f"{store.path / 'errors.log'}"
        )
    return 0 if not outcome.failed else 1
