"""Get a trained preset: from the cache when its recipe matches, else train, score and save it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.checkpoint import (
    build_bundle,
    check_cache_dir,
    checkpoint_path,
    load_cached,
    load_model_dir,
    remove_stale_staging,
    save_checkpoint,
)
from models.evaluate import evaluate
from models.presets import get_preset
from models.train import train


def train_and_save(preset_name: str, cache: Path, *, show_progress: bool = True) -> ModelBundle:
    """Train a preset from its seed, score it on the validation split and save it in the cache."""
    preset = get_preset(preset_name)
    if preset.training is None:
        raise CompoundError(
            f"preset {preset_name!r} is cost-only (random weights); it cannot be trained here"
        )
    bundle = build_bundle(preset_name)
    result = train(bundle, preset.training, show_progress=show_progress)
    started = time.perf_counter()
    validation = evaluate(bundle, split="val", count=2000)
    info = {
        "training": preset.training.to_dict(),
        "train_seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "val_accuracy": validation.accuracy,
        "val_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "params": bundle.param_count(),
    }
    path = checkpoint_path(preset, cache)
    save_checkpoint(bundle, path, info)
    return load_model_dir(path)


def ensure_trained(
    preset_name: str, cache: Path, *, show_progress: bool = True, retrain: bool = False
) -> tuple[ModelBundle, bool]:
    """The trained bundle and whether it was trained just now (False: reused from the cache).

    The cache is checked first, so an unusable one fails before minutes of training.
    """
    preset = get_preset(preset_name)
    path = checkpoint_path(preset, cache)
    will_train = retrain or not path.exists()
    check_cache_dir(cache, writable=will_train)
    remove_stale_staging(path.parent)
    if not will_train:
        return load_cached(preset.name, path), False
    return train_and_save(preset.name, cache, show_progress=show_progress), True
