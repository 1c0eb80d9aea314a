"""The Transform base: one paper technique as a declared, validated, copy-on-apply change.

A transform declares what it touches (`targets`, handle names or fnmatch patterns over
`ModelBundle.handles()`), whether it is lossless and within which tolerance, what it needs
(`requires`), which transforms it cannot be stacked with, and typed parameters. `apply` always
works on a clone, so the bundle it was given stays usable as the baseline. A transform never
measures anything; it may only report what it did in `bundle.metadata`.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from packaging.version import InvalidVersion, Version

from core.errors import CompoundError
from models.bundle import ModelBundle

TRANSFORMS: dict[str, type[Transform]] = {}

_VERSION_REQUIREMENT = re.compile(r"^([A-Za-z0-9_.\-]+)\s*(>=|<=|==|>|<)\s*([0-9][\w.+]*)$")
_COMPARE = {
    ">=": Version.__ge__,
    "<=": Version.__le__,
    "==": Version.__eq__,
    ">": Version.__gt__,
    "<": Version.__lt__,
}


@dataclass(frozen=True)
class Param:
    """One typed parameter: its default, help text and allowed values."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is not allowed
    high_open: bool = False
    nullable: bool = False  # None is a valid value
    choices: tuple[Any, ...] | None = None

    @property
    def type_name(self) -> str:
        return self.type.__name__ + (" | None" if self.nullable else "")

    def range_text(self) -> str | None:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is None and self.high is None:
            return None
        left = "-inf" if self.low is None else f"{self.low:g}"
        right = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{left}, {right}" + (
            ")" if self.high_open or self.high is None else "]"
        )

    def validate(self, owner: str, value: Any) -> Any:
        """The value, converted where harmless (int → float); CompoundError when it is wrong."""
        where = f"transform {owner}: parameter {self.name!r}"
        if value is None:
            if self.nullable:
                return None
            raise CompoundError(f"{where} must be {self.type_name}, got None")
        value = self._coerce(where, value)
        if self.choices is not None and value not in self.choices:
            raise CompoundError(f"{where} must be {self.range_text()}, got {value!r}")
        if not self._in_range(value):
            raise CompoundError(f"{where} must be in {self.range_text()}, got {value!r}")
        return value

    def _coerce(self, where: str, value: Any) -> Any:
        # bool is an int subclass: True must not pass as 1, nor 1 as True.
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) != (self.type is bool) or not isinstance(value, self.type):
            raise CompoundError(
                f"{where} must be {self.type_name}, got {type(value).__name__} {value!r}"
            )
        return value

    def _in_range(self, value: Any) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (
            value > self.high or (self.high_open and value == self.high)
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type_name,
            "default": self.default,
            "help": self.help,
            "range": self.range_text(),
        }


def figure_log(bundle: ModelBundle) -> list[dict[str, Any]]:
    """Where a transform logs what it observes while serving (a wake's latency, tokens kept).

    Each entry is {"metric", "value", "unit"} plus optional "module" and "source"; the worker
    drains the log after every timed block into that block's samples.
    """
    return bundle.metadata.setdefault("figures", [])


def register(cls: type[Transform]) -> type[Transform]:
    """Class decorator: make a transform available by its name."""
    known = TRANSFORMS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"two transforms are named {cls.name!r}: {known} and {cls}")
    TRANSFORMS[cls.name] = cls
    return cls


def unmet_requirement(requirement: str, bundle: ModelBundle) -> str | None:
    """Why one requirement is not met here, or None.

    Understood: "cuda" (the bundle runs on a CUDA device), "materialized" (real weights, not
    the meta device) and "<package><op><version>", e.g. "torch>=2.5".
    """
    if requirement == "cuda":
        if bundle.device.type != "cuda":
            return f"needs a CUDA device (the model is on {bundle.device.type})"
        return None
    if requirement == "materialized":
        return None if bundle.is_materialized else "needs real weights (the model is on meta)"
    match = _VERSION_REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"unknown requirement {requirement!r}")
    package, op, wanted = match.groups()
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return f"needs {requirement} ({package} is not installed)"
    try:
        if _COMPARE[op](Version(installed), Version(wanted)):
            return None
    except InvalidVersion:
        return f"needs {requirement} (cannot read installed version {installed!r})"
    return f"needs {requirement} ({package} {installed} is installed)"


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
    conflicts_with: ClassVar[frozenset[str]] = frozenset()
    params: ClassVar[tuple[Param, ...]] = ()

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
            "conflicts_with": sorted(cls.conflicts_with),
            "params": [p.describe() for p in cls.params],
        }

    def tolerance_for(self, dtype: torch.dtype) -> float:
        """The float32 tolerance scaled by the dtype's machine epsilon (0 for lossy ones)."""
        if self.tolerance is None:
            return 0.0
        scale = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
        return self.tolerance * max(scale, 1.0)

    def check_requirements(self, bundle: ModelBundle) -> str | None:
        """The reason this transform must be skipped on this bundle here, or None."""
        for requirement in sorted(self.requires):
            reason = unmet_requirement(requirement, bundle)
            if reason is not None:
                return reason
        return None

    def validate_for(self, bundle: ModelBundle) -> None:
        """Raise CompoundError if the parameters or the model's structure do not fit.

        Subclasses extend this; the base only insists the targets name some module.
        """
        if not self.target_handles(bundle):
            raise CompoundError(
                f"transform {self.name}: targets {list(self.targets)} match none of the "
                "model's module handles"
            )

    def target_handles(self, bundle: ModelBundle) -> list[str]:
        """The bundle's handle names this transform changes (for per-module attribution)."""
        return [
            handle
            for handle in bundle.handles()
            if any(fnmatch.fnmatchcase(handle, pattern) for pattern in self.targets)
        ]

    def apply(self, bundle: ModelBundle) -> ModelBundle:
        """A transformed clone; `bundle` itself is left untouched."""
        reason = self.check_requirements(bundle)
        if reason is not None:
            raise CompoundError(f"transform {self.name} skipped: {reason}")
        self.validate_for(bundle)
        transformed = bundle.clone()
        self.apply_recorded(transformed)
        return transformed

    def apply_recorded(self, bundle: ModelBundle) -> None:
        """Change `bundle` in place and note what was applied in its metadata."""
        self.apply_in_place(bundle)
        bundle.metadata.setdefault("transforms", []).append(
            {
                "name": self.name,
                "params": dict(self.values),
                "lossless": self.lossless,
                "tolerance": self.tolerance_for(bundle.dtype) if self.lossless else None,
                "targets": self.target_handles(bundle),
            }
        )

    @abstractmethod
    def apply_in_place(self, bundle: ModelBundle) -> None:
        """Change `bundle` (already a private copy); find modules only through its handles."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{type(self).__name__}({args})"
