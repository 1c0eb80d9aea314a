"""`compound transforms`: the registered techniques, what they target and their parameters."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from bench.commands.common import add_json_arg, print_json
from optimizations.registry import list_transforms


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("transforms", help="list the optimization transforms")
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def _param_text(param: dict) -> str:
    bounds = f", {param['range']}" if param["range"] else ""
    return f"{param['name']} ({param['type']}{bounds}) = {param['default']!r}"


def run(args: argparse.Namespace) -> int:
    described = list_transforms()
    if args.json:
        print_json({"transforms": described})
        return 0
    table = Table(title="compound-bench transforms", show_lines=True)
    for column in ("name", "kind", "targets", "requires", "parameters (default)"):
        table.add_column(column, overflow="fold")
    for transform in described:
        kind = (
            f"lossless, |Δlogit| ≤ {transform['tolerance']:g}"
            if transform["lossless"]
            else "lossy: accuracy measured"
        )
        table.add_row(
            transform["name"],
            kind,
            "\n".join(transform["targets"]),
            ", ".join(transform["requires"]) or "-",
            "\n".join(_param_text(p) for p in transform["params"]) or "-",
        )
    console = Console()
    console.print(table)
    for transform in described:
        console.print(f"[bold]{transform['name']}[/bold]: {transform['description']}")
    return 0
