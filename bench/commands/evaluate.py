"""`compound eval`: exact-match accuracy by question type on the held-out test split."""

from __future__ import annotations

import argparse

from bench.commands.common import (
    HOURS,
    Bound,
    add_json_arg,
    add_model_args,
    add_no_limits_arg,
    check_bounds,
    load_trained_bundle,
    positive_int,
    print_json,
)
from models.evaluate import evaluate


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="accuracy of a trained model on the test split")
    add_model_args(parser)
    parser.add_argument(
        "--examples",
        type=positive_int,
        default=2000,
        help="test examples, half image and half text (default 2000: standard error about 0.4%%)",
    )
    add_no_limits_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_bounds(args, {"examples": Bound(low=1, cap=20_000, why=HOURS)})
    bundle = load_trained_bundle(args)
    result = evaluate(bundle, split="test", count=args.examples)
    report = {
        "preset": bundle.preset,
        "params": bundle.param_count(),
        "trained": bundle.trained,
        "source": bundle.source,
        "accuracy": result.accuracy,
        "accuracy_by_kind": result.by_kind,
        "examples": result.counts,
    }
    if args.json:
        print_json(report)
        return 0
    print(
        f"{bundle.preset}: {report['params']:,} parameters, "
        f"{'trained' if bundle.trained else 'UNTRAINED (random weights)'}"
    )
    for modality, accuracy in result.accuracy.items():
        print(f"  {modality:<6} {accuracy:6.1%}  ({result.counts[modality]} test questions)")
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in result.by_kind.items())
    print(f"  by kind: {kinds}")
    return 0
