"""Find transforms by name, apply a configuration's stack, and check lossless claims.

Every module in the `optimizations` package (other than `base`, `registry` and private ones)
is imported once on first use, so a new technique only has to decorate its class with
`@register` to become available.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import torch

import optimizations
from bench.measure.workload import generate
from core.errors import CompoundError
from models.bundle import ModelBundle
from models.prompting import Request, model_inputs
from optimizations.base import TRANSFORMS, Transform

_INFRASTRUCTURE = {"base", "registry"}
_discovered = False


class SpecLike(Protocol):
    """A `bench.configuration.TransformSpec` or anything shaped like it."""

    name: str
    params: dict[str, Any]


class LosslessResult(NamedTuple):
    ok: bool
    max_abs_diff: float
    detail: str


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


def _check_stack(transforms: Sequence[Transform], bundle: ModelBundle) -> None:
    names = [t.name for t in transforms]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise CompoundError(f"transform {name} is listed twice in one configuration")
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


def declared_tolerance(bundle: ModelBundle) -> float:
    """Sum of the applied transforms' recorded tolerances (lossy ones count as 0)."""
    applied = bundle.metadata.get("transforms", [])
    return float(sum(entry["tolerance"] or 0.0 for entry in applied))


def _prefill_logits(bundle: ModelBundle, request: Request) -> torch.Tensor:
    return bundle.model(**model_inputs(bundle, [request])).logits.float().cpu()


@torch.inference_mode()
def check_lossless(
    baseline: ModelBundle,
    transformed: ModelBundle,
    requests: Sequence[Request],
    new_tokens: int,
    tolerance: float | None = None,
) -> LosslessResult:
    """Compare prefill logits (every prompt position) and greedy tokens on each request.

    OK means every request gives the same greedy tokens and every logit is within `tolerance`
    (default: what the transformed bundle's applied transforms declared). A transform that
    changes the prompt's length (token pruning) cannot pass: then only the last position's
    logits are compared, for the figure.
    """
    limit = declared_tolerance(transformed) if tolerance is None else tolerance
    worst, worst_request, token_mismatches, shape_mismatches = 0.0, -1, [], []
    for index, request in enumerate(requests):
        expected = _prefill_logits(baseline, request)
        actual = _prefill_logits(transformed, request)
        if expected.shape != actual.shape:
            shape_mismatches.append(index)
            expected, actual = expected[:, -1], actual[:, -1]
        diff = float((expected - actual).abs().max())
        if diff > worst:
            worst, worst_request = diff, index
        reference = generate(baseline, request, new_tokens).cpu()
        if not torch.equal(reference, generate(transformed, request, new_tokens).cpu()):
            token_mismatches.append(index)
    ok = worst <= limit and not token_mismatches and not shape_mismatches
    where = f" (request {worst_request})" if worst_request >= 0 else ""
    detail = (
        f"{len(requests)} requests: greedy tokens differ in {len(token_mismatches)} "
        f"{token_mismatches[:5]}; max |Δlogit| {worst:.3g}{where} vs tolerance {limit:.3g}"
    )
    if shape_mismatches:
        detail += f"; logit shapes differ in {len(shape_mismatches)} (last position compared)"
    return LosslessResult(ok, worst, detail)
