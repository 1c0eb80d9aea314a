"""`compound calibrate`: how small a change can this machine resolve in a given time budget?

Parses the flags, runs `bench.calibration`, prints the A/A spread, the minimum detectable
effect and the planted slowdowns as measured.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench import suite
from bench.calibration import DEFAULT_PLANTED, DEFAULT_PROCESSES, calibrate, calibration_spec
from bench.commands.common import (
    HOURS,
    Bound,
    add_json_arg,
    add_model_args,
    add_no_limits_arg,
    add_serving_args,
    check_bounds,
    finite_float,
    path_arg,
    positive_int,
    print_json,
    serving_for,
)
from bench.configuration import PLACEMENTS, START_METHODS
from bench.judge.components import Components
from bench.judge.mde import SIMULATIONS
from bench.judge.simulate import ErrorRates
from core.errors import CompoundError
from core.paths import directory_problem

BOUNDS = {
    "budget": Bound(low=0, low_open=True, cap=3600, why=HOURS),
    "requests": Bound(low=1, cap=256, why=HOURS),
    "batch_size": Bound(low=1, cap=512, why=HOURS),
    "processes": Bound(low=2, cap=200, why=HOURS),
    "threads": Bound(low=1, high=1024),
    "simulations": Bound(low=0, cap=100_000, why=HOURS),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("calibrate", help="minimum detectable effect for this machine")
    add_model_args(parser)
    parser.add_argument(
        "--budget",
        type=finite_float,
        default=180.0,
        metavar="SECONDS",
        help="timed seconds over all configurations and processes (default 180, about 4 "
        "minutes with the worker start-ups and the simulation)",
    )
    parser.add_argument(
        "--planted",
        type=finite_float,
        action="append",
        default=None,
        metavar="FRACTION",
        help="known slowdowns to plant (repeatable; default 0.01 0.02 0.05)",
    )
    parser.add_argument("--requests", type=positive_int, default=4, help="requests per block")
    parser.add_argument(
        "--processes",
        type=positive_int,
        default=DEFAULT_PROCESSES,
        metavar="P",
        help=f"worker processes per configuration (default {DEFAULT_PROCESSES}; at least 2, "
        "so the variance between processes is measured)",
    )
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument(
        "--start-method",
        choices=START_METHODS,
        default="forkserver",
        help="how worker processes start (see `compound run --help`)",
    )
    parser.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="coresident",
        help="one process per configuration (isolated) or one process holding them all "
        "(coresident; see `compound run --help`)",
    )
    parser.add_argument(
        "--simulations",
        type=int,
        default=SIMULATIONS,
        metavar="N",
        help=f"simulated runs from the measured components that check the judge's coverage "
        f"and error rates (default {SIMULATIONS}, about 20 s; 0: none)",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_serving_args(parser)
    parser.add_argument(
        "--results-dir",
        type=path_arg,
        default=None,
        help="keep the calibration run here (default: a temporary directory)",
    )
    add_no_limits_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_bounds(args, BOUNDS)
    if args.results_dir is not None:
        problem = directory_problem(args.results_dir, writable=True)
        if problem:
            raise CompoundError(f"--results-dir {problem}")
    planted = tuple(args.planted or DEFAULT_PLANTED)
    source = suite.model_source(
        args.preset, args.model, args.cache_dir, args.device, trained=args.trained
    )
    dtype, serving = serving_for(args, source.device)
    source = replace(source, dtype=dtype)
    threads = args.threads or torch.get_num_threads()
    spec = calibration_spec(
        source,
        planted,
        args.budget,
        args.requests,
        threads,
        args.processes,
        args.start_method,
        serving,
        args.placement,
    )
    console = Console(stderr=True, quiet=args.json)
    with console.status("calibrating") as status:
        report = calibrate(
            spec,
            planted,
            args.results_dir,
            show_progress=not args.json,
            say=status.update,
            simulations=args.simulations,
        )
    if args.json:
        print_json(report)
    else:
        _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    console = Console()
    if report["busy"]["message"]:
        console.print(report["busy"]["message"], style="bold red")
    console.print(
        f"calibration on {report['device']}, {report['budget_s']:.0f} s timed, "
        f"{report['processes']} processes × {report['rounds_per_process']:.1f} rounds each"
    )
    console.print(Components(**report["components"]).line())
    console.print(
        f"A/A: Δ {report['aa_delta']:+.2%} [{report['aa_ci'][0]:+.2%}, "
        f"{report['aa_ci'][1]:+.2%}] ({report['placement']} placement; {report['estimator']})"
    )
    console.print(
        f"minimum detectable effect: {report['mde_pct']:.2f}% for one transform, "
        f"{report['mde_interaction_pct']:.2f}% for an interaction ({report['mde_definition']})"
    )
    table = Table(title="planted slowdowns")
    for column in ("planted", "measured", "95% CI", "covers the truth", "detected"):
        table.add_column(column)
    for row in report["planted"]:
        table.add_row(
            f"{row['planted_slowdown']:.1%}",
            f"{row['measured_slowdown']:+.2%}",
            f"[{row['ci'][0]:+.2%}, {row['ci'][1]:+.2%}]",
            "yes" if row["covers"] else "NO",
            "yes" if row["detected"] else "no",
        )
    console.print(table)
    plans = Table(title="what a given MDE would take here (per configuration)")
    for column in ("contrast", "target MDE", "processes", "rounds each", "seconds"):
        plans.add_column(column)
    for plan in report["plans"]:
        plans.add_row(
            plan["contrast"],
            f"{plan['target']:.0%}",
            str(plan["processes"] or "out of reach"),
            str(plan["rounds_per_process"]),
            "-" if plan["seconds"] is None else f"{plan['seconds']:.0f}",
        )
    console.print(plans)
    if report["simulation"]:
        console.print(ErrorRates(**report["simulation"]).line())
    if report.get("stored_as"):
        console.print(f"kept for `compound run --target`: {report['stored_as']}")
