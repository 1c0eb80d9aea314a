"""Options and parsers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.configuration import ServingSpec, TransformSpec
from core.errors import CompoundError
from core.jsonio import json_text
from models.bundle import ModelBundle
from models.checkpoint import CACHE_ENV_VAR, cache_dir, load_model_dir, load_trained
from models.generation import DTYPES, ENGINES, check_engine
from models.presets import DEFAULT_PRESET, PRESETS
from optimizations.registry import check_order, get_transform


def path_arg(text: str) -> Path:
    """argparse type: a path that is not empty (an empty one would silently mean "here")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text).expanduser()


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN would never stop a loop; infinity never ends one)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


@dataclass(frozen=True)
class Bound:
    """Where a numeric option must lie. `high` is a hard limit; `cap` a soft one, above which a
    run would take hours, lifted by --no-limits."""

    low: float | None = None
    high: float | None = None
    cap: float | None = None
    low_open: bool = False
    why: str = ""

    def problem(self, value: float, lifted: bool) -> str | None:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high:g}" + (f" ({self.why})" if self.why else "")
        if self.cap is not None and value > self.cap and not lifted:
            return f"must be at most {self.cap:g} ({self.why}; --no-limits allows more)"
        return None


SEED = Bound(low=0, high=2**32 - 1, why="seeds are unsigned 32-bit integers")
HOURS = "a larger value keeps it going for hours"


def add_no_limits_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-limits",
        action="store_true",
        help="allow values above the caps that keep a run within hours (--requests, ...)",
    )


def check_bounds(args: argparse.Namespace, bounds: dict[str, Bound]) -> None:
    """One line naming the first option outside its bounds (checked before any work starts)."""
    lifted = bool(getattr(args, "no_limits", False))
    for dest, bound in bounds.items():
        value = getattr(args, dest)
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            problem = None if item is None else bound.problem(item, lifted)
            if problem:
                flag = "--" + dest.replace("_", "-")
                raise CompoundError(f"{flag} {problem}, got {item:g}")


def add_cache_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=path_arg,
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
        type=path_arg,
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
    preset = DEFAULT_PRESET if args.preset is None else args.preset
    return load_trained(preset, cache_dir(args.cache_dir))


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
    `none` is no transforms."""
    if names.strip().lower() == "none":
        if assignments:
            raise CompoundError("--param given, but --transforms is none")
        return ()
    ordered = [n.strip() for n in names.split(",") if n.strip()]
    if not ordered:
        raise CompoundError(
            f"--transforms {names!r} names no transform; list them (a,b,...) or say 'none'"
        )
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
    transforms = [get_transform(name, params[name]) for name in ordered]  # unknown, bad values
    check_order(transforms)
    return tuple(TransformSpec(t.name, dict(t.values)) for t in transforms)


def batch_sizes(text: str) -> tuple[int, ...]:
    """argparse type: '8' or '1,8,32' → distinct positive batch sizes, the first primary."""
    sizes = []
    for part in text.split(","):
        sizes.append(positive_int(part.strip()))
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be distinct, got {text!r}")
    return tuple(sizes)


def add_serving_args(parser: argparse.ArgumentParser) -> None:
    """--engine, --batch-size and --dtype: how every configuration is served."""
    parser.add_argument(
        "--engine",
        default="auto",
        choices=("auto", *ENGINES),
        help="execution engine for every configuration: eager (HF generate, dynamic cache), "
        "static (static KV cache) or graphs (static cache, decode step in CUDA graphs; CUDA "
        "only); auto: graphs on CUDA, eager on CPU (measured faster there than static)",
    )
    parser.add_argument(
        "--batch-size",
        type=batch_sizes,
        default=(1,),
        metavar="N[,N...]",
        help="requests served together (prompts left-padded, the image fraction held in each "
        "batch); a list like 1,8,32 serves every block at each size, the first one primary "
        "(default 1)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPES),
        help="weights and activations: auto is bfloat16 on CUDA and float32 on CPU; in a lower "
        "precision a lossless transform's tolerance is at least 4 units in the last place of a "
        "logit of 16 (compound transforms lists the float32 ones)",
    )


def serving_for(args: argparse.Namespace, device: str) -> tuple[str, ServingSpec]:
    """The dtype and serving the flags ask for on `device` (auto resolved), checked."""
    cuda = device.startswith("cuda")
    dtype = ("bfloat16" if cuda else "float32") if args.dtype == "auto" else args.dtype
    engine = ("graphs" if cuda else "eager") if args.engine == "auto" else args.engine
    check_engine(engine, device)
    return dtype, ServingSpec(engine=engine, batch_sizes=tuple(args.batch_size))
