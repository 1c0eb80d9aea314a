"""Build bundles from presets, and save/load checkpoints in the cache or from a user's directory.

A trained preset's checkpoint lives in `<cache>/checkpoints/<preset>-<key>/`, where the key hashes
the architecture, training settings, dataset version and vocabulary: change any of them and the
old checkpoint is simply not found, so a stale model is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from core.errors import CompoundError
from models.bundle import ModelBundle, prompt_format_for
from models.dataset import vocabulary
from models.presets import Preset, get_preset, llava_config
from models.tokenizer import build_tokenizer

CACHE_ENV_VAR = "COMPOUND_BENCH_CACHE"
DEFAULT_CACHE = Path("~/.cache/compound-bench")
DATASET_VERSION = 5  # bump when the generator's output changes
METADATA_FILE = "compound.json"


def cache_dir(override: str | Path | None = None) -> Path:
    """Flag beats environment variable beats the default."""
    chosen = override or os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def checkpoint_key(preset: Preset) -> str:
    recipe = {
        "vision_family": preset.vision_family,
        "vision": preset.vision,
        "text": preset.text,
        "vision_feature_layer": preset.vision_feature_layer,
        "training": preset.training.to_dict() if preset.training else None,
        "dataset_version": DATASET_VERSION,
        "vocabulary": vocabulary(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def checkpoint_path(preset: Preset, cache: Path) -> Path:
    return cache / "checkpoints" / f"{preset.name}-{checkpoint_key(preset)}"


def build_bundle(
    preset_name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    materialize: bool | None = None,
    seed: int = 0,
) -> ModelBundle:
    """An untrained bundle of a preset.

    Cost-only presets stay on the meta device (no weight memory) unless `materialize=True`;
    then they are built directly on `device` with random weights, flagged untrained.
    """
    preset = get_preset(preset_name)
    config = llava_config(preset)
    if materialize is None:
        materialize = not preset.cost_only
    target = torch.device(device) if materialize else torch.device("meta")
    torch.manual_seed(seed)
    with target:
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    metadata: dict[str, Any] = {"cost_only": preset.cost_only}
    if preset.notes:
        metadata["notes"] = preset.notes
    return ModelBundle(
        model,
        prompt_format_for(model),
        preset.name,
        trained=False,
        source="preset",
        metadata=metadata,
    )


def save_checkpoint(bundle: ModelBundle, path: Path, info: dict[str, Any]) -> None:
    """Write weights (safetensors), config, tokenizer and our metadata, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        bundle.model.save_pretrained(staging, safe_serialization=True)
        bundle.prompts.tokenizer.save_pretrained(staging)
        metadata = {"preset": bundle.preset, "trained": bundle.trained, **info}
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompoundError(f"{what} is missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CompoundError(f"{what} is not valid JSON: {path} ({error})") from None
    if not isinstance(data, dict):
        raise CompoundError(f"{what} does not hold a JSON object: {path}")
    return data


def _own_weights(model: torch.nn.Module) -> None:
    """Copy CPU weights out of the checkpoint's memory map into this process's own memory.

    transformers loads safetensors as views of one file mapping, which stays mapped (and its
    touched pages resident) while any tensor of the file lives. A transform that replaces or
    drops weights (fused projections, vision sleep) would then free nothing: measured on a
    228M-parameter model, fusing q/k/v and gate/up raised a serving block's peak RSS by
    269 MiB, the size of the weights it replaced. Copied, the old weights are freed. The copy
    costs a one-off peak of about twice the weights while loading, outside any timed block.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def load_model_dir(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trained: bool = False,
) -> ModelBundle:
    """Load one of our checkpoints or a LLaVA-family checkpoint directory from disk.

    Our checkpoints record whether they are trained; a directory from elsewhere is taken as
    untrained (cost-only: accuracy is not scored) unless the caller says `trained=True`.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CompoundError(f"model path is not a directory: {directory}")
    config_data = _read_json(directory / "config.json", "model config")
    model_type = config_data.get("model_type")
    if model_type != "llava":
        raise CompoundError(
            f"unsupported architecture {model_type!r} in {directory}: compound-bench loads "
            "LLaVA-family checkpoints (model_type 'llava'); for a Llama-family language model, "
            f"`compound wrap {directory} --out DIR` builds one around it"
        )
    ours = (directory / METADATA_FILE).exists()
    metadata = _read_json(directory / METADATA_FILE, "checkpoint metadata") if ours else {}
    try:
        config = LlavaConfig.from_pretrained(directory)
        model = LlavaForConditionalGeneration.from_pretrained(
            directory, config=config, dtype=dtype, local_files_only=True
        ).to(device)
    except Exception as error:  # safetensors, torch and transformers each raise their own kinds
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise CompoundError(f"cannot load weights from {directory}: {first_line}") from None
    _own_weights(model)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        if ours:
            raise CompoundError(f"checkpoint tokenizer is broken in {directory}: {error}") from None
        tokenizer = build_tokenizer()  # a foreign checkpoint without tokenizer: use our words
    extra = {k: v for k, v in metadata.items() if k not in ("preset", "trained")}
    if not ours:
        extra["external"] = True
    return ModelBundle(
        model,
        prompt_format_for(model, tokenizer),
        preset=str(metadata.get("preset", directory.name)),
        trained=bool(metadata["trained"]) if ours else trained,
        source=str(directory),
        metadata=extra,
    )


def load_trained(preset_name: str, cache: Path, **kwargs: Any) -> ModelBundle:
    """The cached trained checkpoint of a preset, or a clear error saying how to make it."""
    preset = get_preset(preset_name)
    if preset.cost_only:
        raise CompoundError(
            f"preset {preset_name!r} is cost-only (random weights); it has no trained checkpoint"
        )
    path = checkpoint_path(preset, cache)
    if not path.exists():
        raise CompoundError(
            f"no trained checkpoint for preset {preset_name!r} in {cache}; "
            f"run `compound train --preset {preset_name}` first"
        )
    return load_model_dir(path, **kwargs)
