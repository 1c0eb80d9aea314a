"""The Transform base: one paper technique as a declared, validated change to a bundle.

A transform declares what it touches (`targets`, handle names or fnmatch patterns over
`ModelBundle.handles()`), whether it is lossless and within which tolerance, what it needs
(`requires`), which transforms it cannot be stacked with, typed parameters, and the figures it
reports (`figures`). It changes a bundle only through its handles, and never measures: while
serving it opens spans and reports values on `bundle.events`, which the harness's trackers
time and record, and it returns the figures it knows once applied (bytes it freed).
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.generation import ENGINES
from optimizations.params import Param
from optimizations.requirements import unmet_requirement

TRANSFORMS: dict[str, type[Transform]] = {}

FigureKind = Literal["span", "value", "applied"]


@dataclass(frozen=True)
class Figure:
    """One figure a transform reports, declared so reports can show it by name alone.

    kind: "span", work the transform adds while serving, timed by the harness (unit "s");
    "value", a number it reports while serving (e.g. the fraction of tokens kept); "applied",
    a number known once applied, returned by `apply_in_place` (e.g. bytes freed).
    """

    metric: str
    label: str
    unit: str
    kind: FigureKind
    module: str = "total"

    def __post_init__(self) -> None:
        if self.kind == "span" and self.unit != "s":
            raise ValueError(f"figure {self.metric}: a span is timed in seconds, not {self.unit}")

    def describe(self) -> dict[str, str]:
        return asdict(self)


def register(cls: type[Transform]) -> type[Transform]:
    """Class decorator: make a transform available by its name."""
    known = TRANSFORMS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"two transforms are named {cls.name!r}: {known} and {cls}")
    TRANSFORMS[cls.name] = cls
    return cls


# Lossless tolerances in low precision: 4 units in the last place at a logit of magnitude 16
# (the trained `small` reaches |logit| 16.7, measured): 0.5 in bfloat16, 0.0625 in float16,
# below every float32 tolerance declared here (so float32 keeps its own).
LOGIT_ULPS = 4
LOGIT_SCALE = 16.0


class Transform(ABC):
    """One technique. Subclasses set the class attributes and implement `apply_in_place`."""

    name: ClassVar[str]
    description: ClassVar[str]
    targets: ClassVar[tuple[str, ...]]  # handle names or fnmatch patterns, e.g. "layers.*.mlp"
    lossless: ClassVar[bool]
    # Max |logit difference| vs the baseline allowed for a lossless transform, stated for
    # float32 (see `tolerance_for`); None for lossy transforms, whose cost is measured instead.
    tolerance: ClassVar[float | None]
    requires: ClassVar[frozenset[str]] = frozenset()
    # The execution engines (`models.generation.ENGINES`) it runs under; a run on another
    # engine reports it incompatible, with `engine_reason`, before anything is timed.
    engines: ClassVar[frozenset[str]] = frozenset(ENGINES)
    engine_reason: ClassVar[str] = ""
    conflicts_with: ClassVar[frozenset[str]] = frozenset()
    # True for a transform that puts another model in the bundle's place (distillation):
    # whatever came before it in a stack would be thrown away, so it must come first.
    replaces_model: ClassVar[bool] = False
    # Keyword arguments for loading the model it will apply to (`mapped=True`: keep the
    # weights memory-mapped), so a worker loads it that way from the start.
    load_options: ClassVar[dict[str, Any]] = {}
    params: ClassVar[tuple[Param, ...]] = ()
    figures: ClassVar[tuple[Figure, ...]] = ()

    def __init__(self, **values: Any) -> None:
        self.values = self.validate_params(values)

    @classmethod
    def validate_params(cls, values: dict[str, Any]) -> dict[str, Any]:
        """All parameters, defaults filled in; CompoundError naming the first bad one."""
        declared = {p.name: p for p in cls.params}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            known = ", ".join(declared) or "none"
            raise CompoundError(
                f"transform {cls.name}: unknown parameter {unknown[0]!r} (known: {known})"
            )
        return {
            name: param.validate(cls.name, values.get(name, param.default))
            for name, param in declared.items()
        }

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Everything a user needs to choose and configure it, JSON-ready."""
        return {
            "name": cls.name,
            "description": cls.description,
            "targets": list(cls.targets),
            "lossless": cls.lossless,
            "tolerance": cls.tolerance,
            "requires": sorted(cls.requires),
            "engines": [engine for engine in ENGINES if engine in cls.engines],
            "conflicts_with": sorted(cls.conflicts_with),
            "replaces_model": cls.replaces_model,
            "params": [p.describe() for p in cls.params],
            "figures": [f.describe() for f in cls.figures],
        }

    def tolerance_for(self, dtype: torch.dtype) -> float:
        """The logit tolerance in `dtype` (0 for lossy transforms, and for lossless ones that
        declare 0: those must match exactly in any dtype).

        The float32 tolerance, or `LOGIT_ULPS` units in the last place of a logit of magnitude
        `LOGIT_SCALE` in `dtype` when that is larger: a reordered sum in bfloat16 differs in
        its last bits, not by the float32 allowance scaled up (which would be 6.6 for 1e-4).
        """
        if not self.tolerance:
            return 0.0
        return max(self.tolerance, LOGIT_ULPS * LOGIT_SCALE * torch.finfo(dtype).eps)

    def check_requirements(self, bundle: ModelBundle) -> str | None:
        """The reason this transform must be skipped on this bundle here, or None."""
        for requirement in sorted(self.requires):
            reason = unmet_requirement(requirement, bundle)
            if reason is not None:
                return reason
        return None

    def engine_problem(self, engine: str) -> str | None:
        """Why this transform cannot run under `engine`, or None."""
        if engine in self.engines:
            return None
        runs = ", ".join(e for e in ENGINES if e in self.engines)
        return f"incompatible with engine {engine} (runs under {runs}): {self.engine_reason}"

    def prepare(self, bundle: ModelBundle, *, show_progress: bool = True) -> None:
        """Build what this transform needs from `bundle` and caches (a trained student), when
        the run was asked to; most transforms need nothing."""
        return None

    def validate_for(self, bundle: ModelBundle) -> None:
        """Raise CompoundError if the parameters or the model's structure do not fit.

        Subclasses extend this; the base insists the targets name some module and, on real
        weights, that what `cached_input` names exists (a shape alone says nothing of it).
        """
        if not self.target_handles(bundle):
            raise CompoundError(
                f"transform {self.name}: targets {list(self.targets)} match none of the "
                "model's module handles"
            )
        if bundle.is_materialized:
            try:
                self.cached_input(bundle)
            except CompoundError as error:
                raise CompoundError(f"transform {self.name}: {error}") from None

    def cached_input(self, bundle: ModelBundle) -> Path | None:
        """The directory of what `prepare` trains from `bundle` (a student, fine-tuned weights,
        gates), or CompoundError saying how to make it; None for transforms that need none."""
        return None

    def target_handles(self, bundle: ModelBundle) -> list[str]:
        """The bundle's handle names this transform changes (for per-module attribution)."""
        return [
            handle
            for handle in bundle.handles()
            if any(fnmatch.fnmatchcase(handle, pattern) for pattern in self.targets)
        ]

    def apply_recorded(self, bundle: ModelBundle) -> None:
        """Change `bundle` in place and note what was applied, with its applied figures.

        The targets are named on the model as it was given (a transform that replaces the
        model changes modules the new one no longer has)."""
        targets = self.target_handles(bundle)
        applied = self.apply_in_place(bundle) or {}
        declared = {f.metric: f for f in self.figures if f.kind == "applied"}
        if set(applied) - set(declared):
            raise ValueError(
                f"transform {self.name} returned undeclared figures {sorted(set(applied))}"
            )
        bundle.metadata.setdefault("transforms", []).append(
            {
                "name": self.name,
                "params": dict(self.values),
                "lossless": self.lossless,
                "tolerance": self.tolerance_for(bundle.dtype) if self.lossless else None,
                "targets": targets,
                "figures": [
                    {
                        "metric": metric,
                        "value": float(value),
                        "unit": declared[metric].unit,
                        "module": declared[metric].module,
                    }
                    for metric, value in applied.items()
                ],
            }
        )

    @abstractmethod
    def apply_in_place(self, bundle: ModelBundle) -> dict[str, float] | None:
        """Change `bundle` (already a private copy); find modules only through its handles.

        Returns the "applied" figures it declared (metric → value), or None.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{type(self).__name__}({args})"
