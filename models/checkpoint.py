"""Build bundles from presets, and save/load checkpoints in the cache or from a user's directory.

A trained preset's checkpoint lives in `<cache>/checkpoints/<preset>-<key>/`, where the key hashes
the architecture, training settings, dataset version and vocabulary: change any of them and the
old checkpoint is simply not found, so a stale model is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from core.errors import CompoundError
from core.paths import directory_problem
from models.aligned_weights import ensure_aligned
from models.bundle import ModelBundle, prompt_format_for
from models.dataset import vocabulary
from models.presets import Preset, get_preset, llava_config
from models.tokenizer import build_tokenizer

CACHE_ENV_VAR = "COMPOUND_BENCH_CACHE"
DEFAULT_CACHE = Path("~/.cache/compound-bench")
DATASET_VERSION = 5  # bump when the generator's output changes
METADATA_FILE = "compound.json"
# Any of these in a directory means it ships a tokenizer, which must then load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# What loading a directory reads besides config.json and compound.json.
LOADED_FILES = (
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
)
# A save in progress writes into `.<target>-pid<PID>-<random>` next to its target; a save killed
# midway leaves it behind. Before PIDs were in the name it was `.<target>-<random>`.
STAGING_NAME = re.compile(r"\.(?P<target>.+)-pid(?P<pid>\d+)-[a-z0-9_]{8}")
OLD_STAGING_NAME = re.compile(r"\.(?P<target>.+)-[a-z0-9_]{8}")
OLD_STAGING_STALE_S = 3600  # an old-style staging dir this old is no save in progress
FILE_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "device",
    stat.S_IFBLK: "device",
}
MESSAGE_CHARS = 240  # a library message longer than this is cut at a sentence end


def cache_dir(override: str | Path | None = None) -> Path:
    """Flag beats environment variable beats the default."""
    chosen = override or os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def check_cache_dir(path: str | Path, *, writable: bool) -> None:
    """Refuse a cache that cannot work before any training or loading starts, in one line.

    `writable`: a checkpoint will be written there (checked against the directory or, when it
    does not exist yet, its nearest existing parent).
    """
    if not str(path).strip():
        raise CompoundError(
            f"the checkpoint cache path is empty; pass --cache-dir DIR or set ${CACHE_ENV_VAR}"
        )
    cache = Path(path).expanduser()
    for directory in (cache, cache / "checkpoints"):
        problem = directory_problem(directory, writable=writable)
        if problem:
            raise CompoundError(
                f"checkpoint cache {cache} cannot be used: {problem}; "
                f"pass --cache-dir DIR or set ${CACHE_ENV_VAR} to another directory"
            )


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


def _alive(pid: int) -> bool:
    """Whether a process with this PID exists (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        pass
    return True


def remove_stale_staging(directory: Path, target: str | None = None) -> None:
    """Delete staging dirs that killed saves left in `directory` (only `target`'s, if given).

    A dir whose writer's PID is alive may be a save in progress and stays; so does an
    old-style one (no PID in its name) younger than an hour.
    """
    try:
        entries = list(os.scandir(directory))
    except OSError:  # no such directory yet, or unreadable: nothing of ours to clean
        return
    now = time.time()
    for entry in entries:
        new = STAGING_NAME.fullmatch(entry.name)
        match = new or OLD_STAGING_NAME.fullmatch(entry.name)
        if match is None or (target is not None and match["target"] != target):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if new:
                stale = not _alive(int(new["pid"]))
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > OLD_STAGING_STALE_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)


def save_checkpoint(bundle: ModelBundle, path: Path, info: dict[str, Any]) -> None:
    """Write weights (safetensors), config, tokenizer and our metadata, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path.parent, path.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-pid{os.getpid()}-", dir=path.parent))
    try:
        bundle.model.save_pretrained(staging, safe_serialization=True)
        bundle.prompts.tokenizer.save_pretrained(staging)
        metadata = {"preset": bundle.preset, "trained": bundle.trained, **info}
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):  # a file or link where the checkpoint goes: replace it
            path.unlink()
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _not_regular(path: Path, mode: int, what: str) -> CompoundError:
    kind = FILE_KINDS.get(stat.S_IFMT(mode), "special file")
    return CompoundError(f"{what} {path} must be a regular file, not a {kind}; replace it")


def require_regular_file(path: Path, what: str) -> None:
    """Refuse a directory, FIFO or device before opening: a FIFO would block the read forever."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CompoundError(f"{what} is missing: {path}") from None
    except OSError as error:
        raise CompoundError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode, what)


def check_loaded_files(directory: Path) -> None:
    """The files libraries will read must be regular: a FIFO (say, a weight shard) would block
    the load forever, and a directory fails deep inside a library."""
    try:
        entries = list(os.scandir(directory))
    except OSError as error:
        raise CompoundError(f"cannot list {directory}: {error.strerror or error}") from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:  # a dangling link: reported as missing if the load needs it
            continue
        if stat.S_ISREG(mode) or (stat.S_ISDIR(mode) and entry.name not in LOADED_FILES):
            continue
        raise _not_regular(directory / entry.name, mode, "checkpoint file")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    require_regular_file(path, what)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise CompoundError(f"cannot read {what} {path}: {error.strerror or error}") from None
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


@contextmanager
def _quietly() -> Iterator[None]:
    """Keep library warnings and log lines out of our loads: failures are reported in one line.

    Only for the duration of the call, so a caller's own logging settings stay as they were.
    """
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(hf_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _one_line(error: BaseException) -> str:
    """A library's message as one complete line: joined, and cut at a sentence end if long."""
    text = " ".join(str(error).split())
    if not text:
        return type(error).__name__
    if isinstance(error, LookupError):  # a bare key or index says little alone
        text = f"{type(error).__name__}: {text}"
    if len(text) <= MESSAGE_CHARS:
        return text
    end = text.rfind(". ", 0, MESSAGE_CHARS)
    if end > 0:
        return text[: end + 1]
    cut = text.rfind(" ", 0, MESSAGE_CHARS)
    return text[: cut if cut > 0 else MESSAGE_CHARS] + " ..."


def _config_problem(config_data: dict[str, Any]) -> str | None:
    """Which sub-config a config error is in: the library names the field but not its parent."""
    for field in ("text_config", "vision_config"):
        sub = config_data.get(field)
        if isinstance(sub, dict):
            try:
                with _quietly():
                    LlavaConfig(**{field: sub})
            except Exception as error:  # each config class validates in its own way
                return f"{field}: {_one_line(error)}"
    return None


def _load_config(directory: Path, config_data: dict[str, Any]) -> LlavaConfig:
    """The config, or one line naming the field that is wrong."""
    try:
        with _quietly():
            return LlavaConfig.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # huggingface_hub's validation and transformers' own checks
        problem = _config_problem(config_data) or _one_line(error)
        config_file = directory / "config.json"
        raise CompoundError(f"invalid model config {config_file}: {problem}") from None


def _load_weights(
    directory: Path, config: LlavaConfig, dtype: torch.dtype
) -> LlavaForConditionalGeneration:
    """The model, or one line naming the first tensor that does not fit the config."""
    config_file = directory / "config.json"
    try:
        with _quietly():
            model, info = LlavaForConditionalGeneration.from_pretrained(
                directory,
                config=config,
                dtype=dtype,
                local_files_only=True,
                # Report mismatches ourselves: transformers refers to a report it logs instead.
                ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
    except Exception as error:  # safetensors, torch and transformers each raise their own kinds
        raise CompoundError(f"cannot load weights from {directory}: {_one_line(error)}") from None
    if info["mismatched_keys"]:
        name, stored, expected = min(info["mismatched_keys"])
        raise CompoundError(
            f"weights in {directory} do not fit {config_file}: {name} is {list(stored)} in the "
            f"weights but the config makes it {list(expected)}; use the config saved with them"
        )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise CompoundError(
            f"weights in {directory} lack {len(missing)} tensor(s) that {config_file} needs "
            f"(first: {missing[0]}); use the config saved with them"
        )
    return model


def aligned_copy(directory: Path, dtype: torch.dtype) -> Path:
    """The page-aligned copy of `directory`'s weights in the cache (made on first use)."""
    try:
        return ensure_aligned(directory, dtype, cache_dir() / "aligned")
    except (OSError, ValueError) as error:
        raise CompoundError(f"cannot map the weights of {directory}: {error}") from None


def _load_tokenizer(directory: Path, ours: bool) -> PreTrainedTokenizerBase:
    """The directory's tokenizer; our word tokenizer for a foreign one that ships none."""
    present = [directory / name for name in TOKENIZER_FILES if os.path.lexists(directory / name)]
    if ours and directory / "tokenizer.json" not in present:
        raise CompoundError(
            f"checkpoint tokenizer is missing: {directory / 'tokenizer.json'}; "
            "copy it back from where the checkpoint came from"
        )
    if not present:
        return build_tokenizer()
    try:
        with _quietly():
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # transformers and the tokenizers library raise any kind
        remedy = (
            "restore its tokenizer files from where the checkpoint came from"
            if ours
            else "remove its tokenizer files to use compound's word tokenizer"
        )
        raise CompoundError(
            f"cannot load the tokenizer in {directory} ({_one_line(error)}); {remedy}"
        ) from None


def load_model_dir(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trained: bool = False,
    mapped: bool = False,
) -> ModelBundle:
    """Load one of our checkpoints or a LLaVA-family checkpoint directory from disk.

    Our checkpoints record whether they are trained; a directory from elsewhere is taken as
    untrained (cost-only: accuracy is not scored) unless the caller says `trained=True`.

    By default CPU weights are copied out of the file's mapping into this process's own memory
    (`_own_weights`). With `mapped`, they stay views of a memory mapping of a page-aligned copy
    of the weights in `dtype` (`models.aligned_weights`, made once in the cache): no copy, and
    pages are read when first touched.
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
    ours = os.path.lexists(directory / METADATA_FILE)
    metadata = _read_json(directory / METADATA_FILE, "checkpoint metadata") if ours else {}
    check_loaded_files(directory)
    # Config and tokenizer first: they fail quickly, and the tokenizer reads the config too.
    config = _load_config(directory, config_data)
    tokenizer = _load_tokenizer(directory, ours)
    model = _load_weights(aligned_copy(directory, dtype) if mapped else directory, config, dtype)
    try:
        model = model.to(device)
    except Exception as error:  # e.g. out of device memory
        raise CompoundError(f"cannot move {directory} to {device}: {_one_line(error)}") from None
    if not mapped:
        _own_weights(model)
    model.eval()
    extra = {k: v for k, v in metadata.items() if k not in ("preset", "trained")}
    if mapped:
        extra["weights"] = "mapped"
    if not ours:
        extra["external"] = True
    return ModelBundle(
        model,
        prompt_format_for(model, tokenizer),
        preset=str(metadata.get("preset", directory.name)),
        trained=bool(metadata.get("trained", False)) if ours else trained,
        source=str(directory),
        metadata=extra,
    )


def load_cached(preset_name: str, path: Path, **kwargs: Any) -> ModelBundle:
    """A preset's checkpoint from the cache; when it will not load, say how to rebuild it."""
    try:
        return load_model_dir(path, **kwargs)
    except CompoundError as error:
        raise CompoundError(
            f"{error}; `compound train --preset {preset_name} --force` rebuilds it"
        ) from None


def load_trained(preset_name: str, cache: Path, **kwargs: Any) -> ModelBundle:
    """The cached trained checkpoint of a preset, or a clear error saying how to make it."""
    preset = get_preset(preset_name)
    if preset.cost_only:
        raise CompoundError(
            f"preset {preset_name!r} is cost-only (random weights); it has no trained checkpoint"
        )
    check_cache_dir(cache, writable=False)
    path = checkpoint_path(preset, cache)
    remove_stale_staging(path.parent)
    if not path.exists():
        raise CompoundError(
            f"no trained checkpoint for preset {preset_name!r} in {cache}; "
            f"run `compound train --preset {preset_name}` first"
        )
    return load_cached(preset.name, path, **kwargs)
