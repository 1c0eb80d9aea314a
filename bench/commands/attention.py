"""`compound attention`: the attention kernel alone, dense against block-sparse, at a preset's
shapes and prompts of one or more images (see `bench.measure.attention_timing`)."""

from __future__ import annotations

import argparse

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench.commands.common import (
    HOURS,
    Bound,
    add_json_arg,
    add_no_limits_arg,
    batch_sizes,
    check_bounds,
    positive_int,
    print_json,
)
from bench.measure.attention_timing import time_kernels
from core.errors import CompoundError
from models.presets import PRESETS, get_preset
from models.sparse_attention import PATTERNS, flex_problem

BLOCK_SIZES = (16, 32, 64, 128)
BOUNDS = {
    "window": Bound(low=1, high=1_000_000),
    "rounds": Bound(low=3, cap=1_000, why=HOURS),
    "calls": Bound(low=1, cap=10_000, why=HOURS),
    "images": Bound(low=1, cap=64, why="prompts beyond 64 images take minutes per call"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attention",
        help="time the attention kernel alone: dense SDPA vs block-sparse FlexAttention",
    )
    parser.add_argument(
        "--preset",
        default="small-hd",
        help=f"head shapes and visual tokens of: {', '.join(PRESETS)}",
    )
    parser.add_argument("--pattern", default="local", choices=PATTERNS, help="block-sparse pattern")
    parser.add_argument(
        "--window", type=positive_int, default=32, help="local pattern: image tokens seen"
    )
    parser.add_argument(
        "--block-size", type=int, default=16, choices=BLOCK_SIZES, help="BlockMask block size"
    )
    parser.add_argument(
        "--images",
        type=batch_sizes,
        default=(1, 2, 4, 8),
        metavar="N[,N...]",
        help="images per prompt, one timing each (default 1,2,4,8)",
    )
    parser.add_argument("--rounds", type=positive_int, default=30, help="interleaved rounds")
    parser.add_argument("--calls", type=positive_int, default=20, help="calls per kernel per round")
    add_no_limits_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_bounds(args, BOUNDS)
    preset = get_preset(args.preset)
    problem = flex_problem(torch.device("cpu"))
    if problem is not None:
        raise CompoundError(f"block-sparse attention cannot run here: {problem}")
    timings = []
    progress = Progress(
        TextColumn("timing attention"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} prompt lengths"),
        TimeElapsedColumn(),
        disable=args.json,
        transient=True,
    )
    with progress:
        task = progress.add_task("attention", total=len(args.images))
        for images in args.images:
            timings.append(
                time_kernels(
                    preset,
                    images,
                    pattern=args.pattern,
                    window=args.window,
                    block_size=args.block_size,
                    rounds=args.rounds,
                    calls=args.calls,
                )
            )
            progress.advance(task)
    settings = {
        "preset": preset.name,
        "pattern": args.pattern,
        "window": args.window,
        "block_size": args.block_size,
        "rounds": args.rounds,
        "calls": args.calls,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
    }
    if args.json:
        print_json({**settings, "timings": [t.to_dict() for t in timings]})
        return 0
    print(
        f"attention kernel on {preset.name} shapes ({args.pattern}, window {args.window}, "
        f"block {args.block_size}; {args.rounds} rounds × {args.calls} calls, one process, "
        f"{settings['threads']} threads)"
    )
    print(
        f"{'images':>6} {'tokens':>6} {'sparsity':>8} {'work':>6} {'dense ms':>9} "
        f"{'sparse ms':>9}  speedup [95% over rounds]"
    )
    for t in timings:
        print(
            f"{t.images:>6} {t.prompt_tokens:>6} {t.block_sparsity:>8.1%} {t.work_fraction:>6.1%} "
            f"{t.dense_ms:>9.3f} {t.sparse_ms:>9.3f}  {t.speedup:.2f}× "
            f"[{t.speedup_low:.2f}, {t.speedup_high:.2f}]"
        )
    print(
        "sparsity: blocks skipped of the S×S grid; work: blocks computed / dense causal blocks. "
        "One process: differences under 5% are within process-to-process spread."
    )
    return 0
