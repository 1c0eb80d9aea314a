"""Options and parsers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from bench.configuration import TransformSpec
from core.errors import CompoundError
from core.jsonio import json_text
from models.bundle import ModelBundle
from models.checkpoint import CACHE_ENV_VAR, cache_dir, load_model_dir, load_trained
from models.presets import DEFAULT_PRESET, PRESETS
from optimizations.registry import get_transform


def add_cache_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"checkpoint cache (default ${CACHE_ENV_VAR} or ~/.cache/compound-bench)",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--preset or --model (and --trained for a --model directory), plus --cache-dir."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help=f"model preset: {', '.join(PRESETS)} (default {DEFAULT_PRESET})",
    )
    group.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="PATH",
        help="a local LLaVA-family checkpoint directory instead of a preset",
    )
    parser.add_argument(
        "--trained",
        action="store_true",
        help="the --model directory holds trained weights, so accuracy is scored (a directory "
        "from elsewhere counts as untrained unless you say so)",
    )
    add_cache_arg(parser)


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def load_trained_bundle(args: argparse.Namespace) -> ModelBundle:
    """The bundle named by --model or --preset: a checkpoint, or an already trained preset."""
    if args.model is not None:
        return load_model_dir(args.model, trained=args.trained)
    if args.trained:
        raise CompoundError("--trained describes a --model directory; presets know themselves")
    return load_trained(args.preset or DEFAULT_PRESET, cache_dir(args.cache_dir))


def print_json(data: Any) -> None:
    sys.stdout.write(json_text(data))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_fraction(text: str) -> float:
    """'0.10' or '10%' → 0.1; ValueError for anything that is not a finite number."""
    raw = text.strip()
    value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a fraction in [0, 1], written 0.5 or 50%."""
    try:
        value = parse_fraction(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction like 0.5 or 50%, got {text!r}"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def _param_value(text: str) -> Any:
    """A parameter value as typed: JSON numbers, true/false and null, else the bare string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_transforms(names: str, assignments: list[str] | None) -> tuple[TransformSpec, ...]:
    """`a,b` plus `--param a.key=value` flags → validated TransformSpecs, in the order given;
    `none` (or nothing) is no transforms."""
    if names.strip().lower() in ("", "none"):
        if assignments:
            raise CompoundError("--param given, but --transforms is none")
        return ()
    ordered = [n.strip() for n in names.split(",") if n.strip()]
    params: dict[str, dict[str, Any]] = {name: {} for name in ordered}
    for assignment in assignments or []:
        target, _, value = assignment.partition("=")
        transform, _, key = target.partition(".")
        if not value or not key:
            raise CompoundError(f"--param expects TRANSFORM.NAME=VALUE, got {assignment!r}")
        if transform not in params:
            raise CompoundError(
                f"--param {assignment}: transform {transform!r} is not in --transforms"
            )
        params[transform][key] = _param_value(value)
    specs = []
    for name in ordered:
        transform = get_transform(name, params[name])  # unknown names and bad values fail here
        specs.append(TransformSpec(name, dict(transform.values)))
    return tuple(specs)
