"""`compound sweep SPEC.toml`: a matrix of suites scheduled by Ray (see `bench.sweep`)."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench import sweep as sweeps
from bench.commands.common import add_json_arg, path_arg, print_json
from core.errors import CompoundError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep", help="run a matrix of suites (presets, batch sizes, engines, parameters) on Ray"
    )
    parser.add_argument("spec", type=path_arg, metavar="SPEC.toml")
    parser.add_argument(
        "--address",
        default=None,
        help="a Ray cluster to join (e.g. ray://head:10001 or auto); default: a local instance",
    )
    parser.add_argument(
        "--results-dir",
        type=path_arg,
        default=Path("results"),
        help="the sweep's runs go to RESULTS_DIR/<name>/ (default results)",
    )
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def check_run_flags(flags: list[str]) -> None:
    """CompoundError with the one line `compound run` would print for these flags."""
    from bench.cli import parse

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parse(["run", *flags])
    except SystemExit:
        lines = captured.getvalue().strip().splitlines()
        raise CompoundError(lines[-1] if lines else "bad flags") from None


def run(args: argparse.Namespace) -> int:
    sweep = sweeps.plan(args.spec, args.results_dir, check_run_flags)
    progress = Progress(
        TextColumn(f"sweep {sweep.name}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} suites"),
        TimeElapsedColumn(),
        disable=args.json,
        transient=True,
    )
    with progress:
        task = progress.add_task("sweep", total=len(sweep.cells))
        done = sum(1 for cell in sweep.cells if cell.state == "complete")
        progress.update(task, completed=done)
        sweeps.run_sweep(sweep, args.address, advance=lambda cell: progress.advance(task))
    failed = [cell for cell in sweep.cells if cell.state != "complete"]
    if args.json:
        print_json({"directory": str(sweep.directory), **sweep.to_dict()})
    else:
        print(
            f"sweep {sweep.name}: {len(sweep.cells) - len(failed)}/{len(sweep.cells)} suites "
            f"complete in {sweep.directory} (index.html, sweep.json)"
        )
        for cell in sweep.cells:
            where = f" on {cell.node}" if cell.node else ""
            note = f": {cell.error}" if cell.error else ""
            print(f"  {cell.run_id}: {cell.state}{where}{note}")
    return 1 if failed else 0
