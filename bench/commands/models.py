"""`compound models`: the presets, their sizes, and whether they are trained or cost-only."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from bench.commands.common import add_cache_arg, add_json_arg, print_json
from models.checkpoint import build_bundle, cache_dir, check_cache_dir, checkpoint_path
from models.presets import PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list model presets")
    add_cache_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def rows(cache) -> list[dict]:
    listing = []
    for preset in PRESETS.values():
        bundle = build_bundle(preset.name)  # cost-only shapes stay on the meta device: instant
        cached = not preset.cost_only and checkpoint_path(preset, cache).exists()
        listing.append(
            {
                "preset": preset.name,
                "params": bundle.param_count(),
                "image_tokens": preset.image_tokens,
                "decoder_layers": preset.text["num_hidden_layers"],
                "kind": "cost-only (random weights, untrained)" if preset.cost_only else "trained",
                "checkpoint_cached": cached,
                "description": preset.description,
            }
        )
    return listing


def run(args: argparse.Namespace) -> int:
    cache = cache_dir(args.cache_dir)
    check_cache_dir(cache, writable=False)
    listing = rows(cache)
    if args.json:
        print_json({"presets": listing})
        return 0
    table = Table(title="compound-bench model presets")
    for column in ("preset", "params", "visual tokens", "layers", "kind", "cached"):
        table.add_column(column)
    for row in listing:
        cached = (
            "-" if row["kind"].startswith("cost") else ("yes" if row["checkpoint_cached"] else "no")
        )
        table.add_row(
            row["preset"],
            f"{row['params'] / 1e6:,.2f}M",
            str(row["image_tokens"]),
            str(row["decoder_layers"]),
            row["kind"],
            cached,
        )
    Console().print(table)
    return 0
