"""`compound sparse-gemm`: each decoder linear shape of a preset, dense against 2:4 sparse, on
CUDA (see `bench.measure.gemm_timing`); elsewhere one line says why it cannot run."""

from __future__ import annotations

import argparse

import torch

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
from bench.measure.gemm_timing import linear_shapes, time_shape
from core.errors import CompoundError
from models.presets import PRESETS, get_preset
from models.semi_structured import device_problem

BOUNDS = {
    "rounds": Bound(low=3, cap=1_000, why=HOURS),
    "calls": Bound(low=1, cap=10_000, why=HOURS),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sparse-gemm",
        help="time a preset's decoder linears dense vs 2:4 semi-structured sparse (CUDA)",
    )
    parser.add_argument("--preset", default="smolvlm-256m", help=", ".join(PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument(
        "--tokens",
        type=batch_sizes,
        default=(32, 2048, 8192),
        metavar="N[,N...]",
        help="rows fed to each linear: a decode step's batch, prefills (default 32,2048,8192)",
    )
    parser.add_argument("--rounds", type=positive_int, default=20, help="interleaved rounds")
    parser.add_argument("--calls", type=positive_int, default=50, help="calls per kernel per round")
    add_no_limits_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_bounds(args, BOUNDS)
    preset = get_preset(args.preset)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(device, dtype)
    if problem is not None:
        raise CompoundError(f"sparse-gemm cannot run here: {problem}")
    rows, skipped = [], []
    for shape, names in linear_shapes(preset).items():
        for tokens in args.tokens:
            result = time_shape(shape, names, tokens, dtype, rounds=args.rounds, calls=args.calls)
            if isinstance(result, str):
                skipped.append({"linears": ", ".join(names), "reason": result})
                break
            rows.append(result)
    settings = {
        "preset": preset.name,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "calls": args.calls,
    }
    if args.json:
        print_json({**settings, "timings": [r.to_dict() for r in rows], "skipped": skipped})
        return 0
    print(f"2:4 sparse vs dense linears, {preset.name} shapes, {args.dtype}, {settings['device']}")
    print(f"{'linears':<28} {'out×in':>11} {'tokens':>6} {'dense ms':>9} {'sparse ms':>9}  speedup")
    for r in rows:
        print(
            f"{r.linears:<28} {f'{r.out_features}×{r.in_features}':>11} {r.tokens:>6} "
            f"{r.dense_ms:>9.4f} {r.sparse_ms:>9.4f}  {r.speedup:.2f}× "
            f"[{r.speedup_low:.2f}, {r.speedup_high:.2f}]"
        )
    for entry in skipped:
        print(f"{entry['linears']}: skipped ({entry['reason']})")
    return 0
