"""Designs: which configurations a suite measures, built from an ordered list of transforms.

- singles: the baseline, each transform alone, and all of them stacked.
- leave-one-out: the stack, and the stack without each transform in turn (the baseline too).
- factorial: every subset (2^n configurations, n <= 6).

Designs combine ("singles,leave-one-out"); a configuration two designs share is measured once.
An A/A control, a second baseline in its own worker process, measures how far two identical
processes differ (measured on this CPU: about 2%), the noise floor no round-pairing removes.
A configuration is named by its transforms joined with "+", in the order given, so the same
subset always gets the same name; the empty one is "baseline".
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from bench.configuration import Configuration, TransformSpec
from core.errors import CompoundError

DESIGNS = ("singles", "leave-one-out", "factorial")
BASELINE = "baseline"
AA_CONTROL = "baseline-aa"
MAX_FACTORIAL = 6


def config_name(names: Sequence[str]) -> str:
    """The name of the configuration stacking these transforms, in this order."""
    return "+".join(names) or BASELINE


def _subset(transforms: Sequence[TransformSpec], keep: Sequence[int]) -> Configuration:
    specs = tuple(transforms[i] for i in sorted(keep))
    return Configuration(config_name([spec.name for spec in specs]), specs)


def _indices(design: str, n: int) -> list[tuple[int, ...]]:
    everything = tuple(range(n))
    if design == "singles":
        return [(), *((i,) for i in range(n)), everything]
    if design == "leave-one-out":
        return [(), everything, *(tuple(j for j in everything if j != i) for i in range(n))]
    if n > MAX_FACTORIAL:
        raise CompoundError(
            f"design factorial takes at most {MAX_FACTORIAL} transforms ({2**n} configurations "
            f"for {n}); use singles or leave-one-out"
        )
    return [c for size in range(n + 1) for c in combinations(everything, size)]


def parse_designs(text: str) -> tuple[str, ...]:
    """'singles,leave-one-out' → ('singles', 'leave-one-out'); CompoundError for unknown ones."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in DESIGNS]
    if unknown or not names:
        raise CompoundError(
            f"unknown design {unknown[0] if unknown else text!r} (known: {', '.join(DESIGNS)})"
        )
    return names


def build_configurations(
    transforms: Sequence[TransformSpec], designs: Sequence[str], aa_control: bool = False
) -> tuple[Configuration, ...]:
    """The configurations the designs call for, baseline first, each subset once, and the
    A/A control last when asked for (and there is anything to compare).

    With no transforms only the baseline is measured.
    """
    names = [t.name for t in transforms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CompoundError(f"transform {duplicates[0]} is listed twice")
    seen: dict[tuple[int, ...], Configuration] = {}
    for design in designs:
        for keep in _indices(design, len(transforms)):
            if keep not in seen:
                seen[keep] = _subset(transforms, keep)
    control = (Configuration(AA_CONTROL),) if aa_control and transforms else ()
    return (*seen.values(), *control)
