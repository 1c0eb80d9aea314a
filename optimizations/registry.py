"""Find transforms by name and apply a configuration's stack of them.

Every module in the `optimizations` package (other than the infrastructure modules and private
ones) is imported once on first use, so a new technique only has to decorate its class with
`@register` to become available.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import optimizations
from core.errors import CompoundError
from models.bundle import ModelBundle
from optimizations.base import TRANSFORMS, Transform

_INFRASTRUCTURE = {"base", "registry", "params", "requirements", "lossless"}
_discovered = False


class SpecLike(Protocol):
    """A `bench.configuration.TransformSpec` or anything shaped like it."""

    name: str
    params: dict[str, Any]


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules(optimizations.__path__):
        if info.name in _INFRASTRUCTURE or info.name.startswith("_"):
            continue
        module = f"optimizations.{info.name}"
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise CompoundError(f"cannot load transform module {module}: {error}") from None
    _discovered = True


def transform_classes() -> dict[str, type[Transform]]:
    _discover()
    return dict(sorted(TRANSFORMS.items()))


def get_transform(name: str, params: dict[str, Any] | None = None) -> Transform:
    """A validated transform instance; CompoundError for unknown names or bad parameters."""
    classes = transform_classes()
    if name not in classes:
        known = ", ".join(classes) or "none"
        raise CompoundError(f"unknown transform {name!r} (known: {known})")
    return classes[name](**(params or {}))


def list_transforms() -> list[dict[str, Any]]:
    """Descriptions of every known transform, sorted by name (for `compound transforms`)."""
    return [cls.describe() for cls in transform_classes().values()]


def check_order(transforms: Sequence[Transform]) -> None:
    """A transform that replaces the model must come first: it would discard the others."""
    for i, transform in enumerate(transforms):
        if transform.replaces_model and i > 0:
            earlier = ", ".join(t.name for t in transforms[:i])
            raise CompoundError(
                f"transform {transform.name} replaces the model, so it must come first in "
                f"--transforms (it would discard {earlier})"
            )


def _check_stack(transforms: Sequence[Transform], bundle: ModelBundle) -> None:
    names = [t.name for t in transforms]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise CompoundError(f"transform {name} is listed twice in one configuration")
    check_order(transforms)
    for i, first in enumerate(transforms):
        for second in transforms[i + 1 :]:
            if second.name in first.conflicts_with or first.name in second.conflicts_with:
                raise CompoundError(
                    f"transforms {first.name} and {second.name} conflict and cannot be stacked"
                )
    for transform in transforms:
        reason = transform.check_requirements(bundle)
        if reason is not None:
            raise CompoundError(f"transform {transform.name} skipped: {reason}")


def apply_transforms(
    bundle: ModelBundle, specs: Iterable[SpecLike], *, copy: bool = True
) -> ModelBundle:
    """Apply a configuration's transforms in order and return the transformed bundle.

    Everything that can be checked before touching the model is (parameters, duplicates,
    declared conflicts, requirements); each transform's fit to the model is checked just before
    it applies, on the model as the earlier transforms left it. With `copy=False` the bundle is
    changed in place, saving the one clone when the caller no longer needs the original.
    """
    transforms = [get_transform(spec.name, dict(spec.params)) for spec in specs]
    _check_stack(transforms, bundle)
    if not transforms:
        return bundle
    result = bundle.clone() if copy else bundle
    for transform in transforms:
        transform.validate_for(result)
        transform.apply_recorded(result)
    return result
