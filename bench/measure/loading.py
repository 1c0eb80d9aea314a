"""From a run's ModelSource to a bundle on its device, transformed for one configuration."""

from __future__ import annotations

from typing import Any

import torch

from bench.configuration import Configuration, ModelSource
from core.errors import CompoundError
from models.bundle import ModelBundle
from models.checkpoint import build_bundle, cache_dir, load_model_dir, load_trained
from models.presets import get_preset
from optimizations.registry import apply_transforms, get_transform


def resolve_device(choice: str) -> str:
    """`auto` means CUDA when available; asking for CUDA without it is a user error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise CompoundError("--device cuda asked for, but CUDA is not available on this machine")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def load_bundle(source: ModelSource, configuration: Configuration | None = None) -> ModelBundle:
    """The untransformed model the source names: a checkpoint directory, a trained preset
    from the cache, or a cost-only preset with random weights built on the device; loaded as
    the configuration's transforms ask (`Transform.load_options`: mapped weights)."""
    dtype = getattr(torch, source.dtype)
    options: dict[str, Any] = {}
    for spec in configuration.transforms if configuration else ():
        options.update(get_transform(spec.name, spec.params).load_options)
    if source.model_path:
        return load_model_dir(
            source.model_path,
            device=source.device,
            dtype=dtype,
            trained=source.trained,
            **options,
        )
    preset = get_preset(str(source.preset))
    if preset.cost_only:
        return build_bundle(preset.name, device=source.device, dtype=dtype, materialize=True)
    return load_trained(
        preset.name, cache_dir(source.cache_dir), device=source.device, dtype=dtype, **options
    )


def apply_configuration(bundle: ModelBundle, configuration: Configuration) -> ModelBundle:
    """The configuration's transforms applied in place: a worker never needs the baseline, and
    two copies would inflate its peak memory."""
    if not configuration.transforms:
        return bundle
    return apply_transforms(bundle, configuration.transforms, copy=False)
