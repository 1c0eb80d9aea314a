"""`compound coldstart`: process start → weights loaded → first token, in fresh processes, for
the baseline and each given transform alone (by default `mmap_load`: memory-mapped,
page-aligned weights against compound's copying load); see `bench.measure.coldstart`."""

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
    parse_transforms,
    positive_int,
    print_json,
)
from bench.configuration import Configuration
from bench.designs import BASELINE
from bench.measure.coldstart import EVICTIONS, checkpoint_for, run_cold_starts, summarize
from core.errors import CompoundError
from models.checkpoint import cache_dir, check_cache_dir
from models.presets import PRESETS

BOUNDS = {"repeats": Bound(low=1, cap=200, why="each repeat starts fresh processes")}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "coldstart",
        help="time process start → weights loaded → first token in fresh processes",
    )
    parser.add_argument("--preset", default="small", help=", ".join(PRESETS))
    parser.add_argument(
        "--transforms",
        default="mmap_load",
        metavar="A,B,...",
        help="each measured alone beside the baseline (default mmap_load; 'none': baseline only)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="T.NAME=VALUE",
        help="a transform parameter (repeatable)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=7, help="processes per configuration (7)"
    )
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


def configurations_for(text: str, params: list[str]) -> tuple[Configuration, ...]:
    """The baseline and each named transform alone (names and parameters checked)."""
    specs = parse_transforms(text, params)
    return (Configuration(BASELINE), *(Configuration(spec.name, (spec,)) for spec in specs))


def run(args: argparse.Namespace) -> int:
    check_bounds(args, BOUNDS)
    if args.preset not in PRESETS:
        raise CompoundError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    configurations = configurations_for(args.transforms, args.param)
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
        task = progress.add_task("cold", total=args.repeats * len(configurations))
        results = run_cold_starts(
            directory,
            configurations,
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
        f"processes per configuration; {'; '.join(settings['eviction'])}"
    )
    width = max(len(name) for name in summary["medians"])
    print(
        f"{'configuration':<{width}} {'spawn s':>8} {'import s':>8} {'load s':>8} "
        f"{'1st tok s':>9} {'total s':>8} {'maj. faults':>11} {'peak RSS MiB':>12}   (medians)"
    )
    for name, values in summary["medians"].items():
        print(
            f"{name:<{width}} {values['spawn_s']:>8.3f} {values['import_s']:>8.3f} "
            f"{values['load_s']:>8.3f} {values['first_token_s']:>9.3f} {values['total_s']:>8.3f} "
            f"{values['major_faults']:>11.0f} {values['peak_rss_mib']:>12.1f}"
        )
    for name, ratios in summary["speedup"].items():
        load, total = ratios["load_s"], ratios["total_s"]
        print(
            f"{name} against {summary['reference']}: load {load['median']:.2f}× "
            f"[{load['low']:.2f}, {load['high']:.2f}], process start to first token "
            f"{total['median']:.2f}× [{total['low']:.2f}, {total['high']:.2f}] "
            "(above 1: faster; 95% over repeats)"
        )
    return 0
