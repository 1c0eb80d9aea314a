"""`compound judge TABLE.csv`: a published ablation table judged with our verdict's rules
(see `bench.judge.external` for the two table shapes)."""

from __future__ import annotations

import argparse

import pandas as pd

from bench.commands.common import add_json_arg, finite_float, path_arg, print_json
from bench.judge.external import TableError, judge_table
from core.errors import CompoundError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "judge", help="judge an external ablation table (sequential, or singles + stack)"
    )
    parser.add_argument("table", type=path_arg, metavar="TABLE.csv")
    parser.add_argument(
        "--margin",
        type=finite_float,
        default=2.0,
        metavar="PP",
        help="equivalence margin in percentage points, as in compound run (default 2)",
    )
    parser.add_argument(
        "--higher-is-better",
        action="store_true",
        help="values are throughputs (tokens/s): judged as their inverse, a cost",
    )
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def _read(path) -> pd.DataFrame:
    if not path.is_file():
        raise CompoundError(f"table not found: {path}")
    try:
        return pd.read_csv(path, comment="#", skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompoundError(f"cannot read {path} as CSV: {first}") from None


def run(args: argparse.Namespace) -> int:
    if not 0 < args.margin <= 100:
        raise CompoundError(f"--margin must be in (0, 100] percentage points, got {args.margin:g}")
    try:
        judgement = judge_table(_read(args.table), args.margin / 100, args.higher_is_better)
    except TableError as error:
        raise CompoundError(f"{args.table}: {error}") from None
    if args.json:
        print_json(judgement.to_dict())
        return 0
    print(f"{args.table} ({judgement.shape}); Δ > 0 saves")
    width = max(len(step["step"]) for step in judgement.steps)
    for step in judgement.steps:
        known = step["lo"] == step["lo"]  # not NaN
        interval = f" [{step['lo']:+.1%}, {step['hi']:+.1%}]" if known else ""
        print(f"  {step['step']:<{width}}  Δ {step['delta']:+.1%}{interval}")
    predicted, measured, residual = judgement.predicted, judgement.measured, judgement.residual
    print(f"eq 4.2 from the steps: {predicted.point:+.2%}")
    if measured is not None:
        print(f"measured: {measured.point:+.2%}; residual {residual.point:+.2%}")
    print(f"word: {judgement.word}: {judgement.reason}")
    for flag in judgement.flags:
        print(f"flag: {flag}")
    return 0
