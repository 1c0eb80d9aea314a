"""`compound wrap`: put a random vision tower in front of a Llama-family LM, to measure it."""

from __future__ import annotations

import argparse

from bench.commands.common import SEED, add_json_arg, check_bounds, path_arg, print_json
from models.presets import PRESETS
from models.wrap import DEFAULT_VISION_PRESET, wrap_language_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "wrap",
        help="build a LLaVA checkpoint around a Llama-family language model (costs only)",
        description="Write a LLaVA checkpoint whose decoder and lm_head are SOURCE's weights, "
        "unchanged, behind a random vision tower and projector. Its accuracy is not scored "
        "(the vision tower is untrained); measure its costs with `compound run --model DIR`.",
    )
    parser.add_argument(
        "source",
        type=path_arg,
        metavar="SOURCE",
        help="a causal LM directory (config.json + weights) or a .gguf file",
    )
    parser.add_argument(
        "--out", type=path_arg, required=True, metavar="DIR", help="new checkpoint directory"
    )
    parser.add_argument(
        "--vision-from",
        default=DEFAULT_VISION_PRESET,
        metavar="PRESET",
        help=f"preset whose vision tower shape to use: {', '.join(PRESETS)} "
        f"(default {DEFAULT_VISION_PRESET})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random vision weights (default 0)"
    )
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_bounds(args, {"seed": SEED})
    report = wrap_language_model(
        args.source, args.out, vision_from=args.vision_from, seed=args.seed
    )
    if args.json:
        print_json(report)
        return 0
    print(f"wrapped {report['source']} into {report['out']}")
    print(
        f"  {report['language_model_params']:,} language-model parameters ({report['dtype']}) "
        f"+ {report['vision_params']:,} random vision parameters ({report['vision_from']} shape)"
    )
    print(
        f"  untrained: accuracy is not scored; measure its costs with "
        f"`compound run --model {report['out']}`"
    )
    return 0
