"""`compound export --pytest-benchmark RUN > file.json`: a stored run in pytest-benchmark's
JSON format (see `bench.report.pytest_benchmark`), for `pytest-benchmark compare`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.commands.common import path_arg, print_json
from bench.report.pytest_benchmark import export
from bench.store import load_run, resolve_run
from core.errors import CompoundError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a stored run in another tool's format (pytest-benchmark JSON)"
    )
    parser.add_argument("run", metavar="RUN", help="run id (under --results-dir) or path")
    parser.add_argument(
        "--pytest-benchmark",
        action="store_true",
        required=True,
        help="pytest-benchmark's JSON (the only format so far), on standard output",
    )
    parser.add_argument("--results-dir", type=path_arg, default=Path("results"))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_run(resolve_run(args.run, args.results_dir))
    document = export(loaded.meta, loaded.samples)
    if not document["benchmarks"]:
        raise CompoundError(f"run {args.run!r} has no timed rounds to export")
    print_json(document)
    return 0
