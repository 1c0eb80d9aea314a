"""`compound coldstart`: process start → weights loaded → first token, in fresh processes,
compound's copying load against memory-mapped, page-aligned weights (`mmap_load`); see
`bench.measure.coldstart`."""

from __future__ import annotations

import argparse

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench.commands.common import (
    Bound,
    add_cache_arg,
    add_json_arg,
    add_no_limits_arg,
    check_bounds,
    positive_int,
    print_json,
)
from bench.measure.coldstart import EVICTIONS, LOADERS, checkpoint_for, run_cold_starts, summarize
from core.errors import CompoundError
from models.checkpoint import cache_dir, check_cache_dir
from models.presets import PRESETS

BOUNDS = {"repeats": Bound(low=1, cap=200, why="each repeat starts fresh processes")}


def _loaders(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    unknown = [name for name in names if name not in LOADERS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct loaders among {', '.join(LOADERS)}, got {text!r}"
        )
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "coldstart",
        help="time process start → weights loaded → first token in fresh processes, per loader",
    )
    parser.add_argument("--preset", default="small", help=", ".join(PRESETS))
    parser.add_argument(
        "--loaders",
        type=_loaders,
        default=LOADERS,
        metavar="L[,L]",
        help="copy (compound's default load) and/or mmap (mmap_load's); default both",
    )
    parser.add_argument("--repeats", type=positive_int, default=7, help="processes per loader")
    parser.add_argument(
        "--evict",
        choices=EVICTIONS,
        default="weights",
        help="before each process: evict the weight files' pages (default), drop the whole "
        "page cache (root only), or none (warm)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    add_cache_arg(parser)
    add_no_limits_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_bounds(args, BOUNDS)
    if args.preset not in PRESETS:
        raise CompoundError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    cache = cache_dir(args.cache_dir)
    check_cache_dir(cache, writable=True)
    threads = args.threads or torch.get_num_threads()
    directory = checkpoint_for(args.preset, cache, getattr(torch, args.dtype))
    progress = Progress(
        TextColumn("cold starts"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} processes"),
        TimeElapsedColumn(),
        disable=args.json,
        transient=True,
    )
    with progress:
        task = progress.add_task("cold", total=args.repeats * len(args.loaders))
        results = run_cold_starts(
            directory,
            args.loaders,
            repeats=args.repeats,
            dtype=args.dtype,
            threads=threads,
            how=args.evict,
            advance=lambda: progress.advance(task),
        )
    summary = summarize(results)
    settings = {
        "preset": args.preset,
        "checkpoint": str(directory),
        "dtype": args.dtype,
        "threads": threads,
        "repeats": args.repeats,
        "eviction": sorted({r.eviction for r in results}),
        "torch": torch.__version__,
    }
    if args.json:
        print_json({**settings, **summary, "processes": [r.to_dict() for r in results]})
        return 0
    print(
        f"cold start of {args.preset} ({args.dtype}, {threads} threads), {args.repeats} fresh "
        f"processes per loader; {'; '.join(settings['eviction'])}"
    )
    print(
        f"{'loader':<6} {'spawn s':>8} {'import s':>8} {'load s':>8} {'1st tok s':>9} "
        f"{'total s':>8} {'maj. faults':>11} {'peak RSS MiB':>12}   (medians)"
    )
    for loader, values in summary["medians"].items():
        print(
            f"{loader:<6} {values['spawn_s']:>8.3f} {values['import_s']:>8.3f} "
            f"{values['load_s']:>8.3f} {values['first_token_s']:>9.3f} {values['total_s']:>8.3f} "
            f"{values['major_faults']:>11.0f} {values['peak_rss_mib']:>12.1f}"
        )
    for loader, ratios in summary["speedup_vs_copy"].items():
        load, total = ratios["load_s"], ratios["total_s"]
        print(
            f"{loader} against copy: load {load['median']:.2f}× [{load['low']:.2f}, "
            f"{load['high']:.2f}], process start to first token {total['median']:.2f}× "
            f"[{total['low']:.2f}, {total['high']:.2f}] (above 1: faster; 95% over repeats)"
        )
    return 0
