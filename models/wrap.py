"""Wrap a Llama-family language model in a LLaVA checkpoint, so the harness can measure it.

The harness measures LLaVA-family models only. A causal LM on its own (a directory with
config.json and weights, or one `.gguf` file) becomes one here: its weights, unchanged, are the
decoder and lm_head; a vision tower and projector shaped like a preset's, with random weights,
are put in front. The result is untrained for our task (the vision tower is random), so it
measures costs; accuracy is not scored.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from core.errors import CompoundError
from core.paths import directory_problem
from models.bundle import ModelBundle, count_parameters, prompt_format_for
from models.checkpoint import (
    TOKENIZER_FILES,
    check_loaded_files,
    require_regular_file,
    save_checkpoint,
)
from models.presets import get_preset, llava_config
from models.tokenizer import build_tokenizer

DEFAULT_VISION_PRESET = "smolvlm-256m"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj")
# transformers dequantizes GGUF with the gguf package and refuses to without accelerate.
GGUF_PACKAGES = ("gguf", "accelerate")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def _quiet_transformers():
    """transformers logs warnings while probing foreign classes; errors here must stay one line."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _check_out(out: Path) -> None:
    problem = directory_problem(out, writable=True)
    if problem:
        raise CompoundError(f"--out {problem}")
    if out.exists() and any(out.iterdir()):
        raise CompoundError(f"output directory {out} already exists and is not empty; pick another")


def _source_location(source: Path) -> tuple[Path, dict[str, Any]]:
    """The directory transformers reads and its extra arguments (`gguf_file` for a GGUF file)."""
    if source.suffix == ".gguf" and not source.is_dir():
        require_regular_file(source, "GGUF file")
        missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            needed = " ".join(missing)
            raise CompoundError(f"reading a GGUF file needs more packages: pip install {needed}")
        return source.parent, {"gguf_file": source.name}
    if not source.is_dir():
        raise CompoundError(f"language model source is not a directory or a .gguf file: {source}")
    config_path = source / "config.json"
    require_regular_file(config_path, "model config")
    check_loaded_files(source)
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except FileNotFoundError:
        raise CompoundError(f"model config is missing: {config_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise CompoundError(
            f"model config is not a valid JSON object: {config_path} ({error})"
        ) from None
    if model_type == "llava":
        raise CompoundError(
            f"{source} is already a LLaVA checkpoint: use it directly with `--model {source}`"
        )
    return source, {}


def _check_llama_family(probe: nn.Module, model_type: str, source: Path) -> None:
    """Our transforms and handles find decoder layers as Llama lays them out; refuse the rest."""
    layers = getattr(getattr(probe, "model", None), "layers", None)
    shaped = (
        isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and isinstance(getattr(probe, "lm_head", None), nn.Linear)
        and all(
            isinstance(getattr(getattr(layer, part, None), name, None), nn.Linear)
            for layer in layers
            for part, names in (("self_attn", ATTENTION_PROJECTIONS), ("mlp", MLP_PROJECTIONS))
            for name in names
        )
    )
    if not shaped:
        raise CompoundError(
            f"{source} holds a {model_type!r} model ({type(probe).__name__}), not a Llama-family "
            "decoder: compound wrap needs decoder layers with self_attn.q_proj/k_proj/v_proj and "
            "mlp.gate_proj/up_proj (Llama, Mistral, Qwen2, SmolLM and the like)"
        )


def _load_config(directory: Path, extra: dict[str, Any], source: Path) -> PretrainedConfig:
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(directory, local_files_only=True, **extra)
    except Exception as error:  # unknown model types, malformed configs, unreadable GGUF
        raise CompoundError(
            f"cannot read the model config of {source}: {_first_line(error)}"
        ) from None


def _probe(config: PretrainedConfig, source: Path) -> nn.Module:
    """The causal LM's module tree on the meta device: its shape, without loading a weight."""
    try:
        with _quiet_transformers(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as error:  # not a causal LM transformers knows
        raise CompoundError(
            f"{source} is not a causal language model transformers can load "
            f"({config.model_type!r}): {_first_line(error)}"
        ) from None


def _load_tokenizer(
    directory: Path, extra: dict[str, Any], source: Path, vocab_size: int
) -> tuple[PreTrainedTokenizerBase, str]:
    """The source's own tokenizer when it ships one, else our word tokenizer (if it fits)."""
    if extra or any((directory / name).exists() for name in TOKENIZER_FILES):
        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
        except Exception as error:  # each tokenizer backend raises its own kinds
            raise CompoundError(
                f"the tokenizer of {source} cannot be loaded: {_first_line(error)}"
            ) from None
        return tokenizer, "source"
    tokenizer = build_tokenizer()
    # Our word ids and the image token (the last id) must be distinct ids inside the vocabulary.
    if vocab_size <= len(tokenizer):
        raise CompoundError(
            f"{source} has no tokenizer and its vocabulary ({vocab_size}) is too small for "
            f"compound-bench's word tokenizer ({len(tokenizer)} words plus the image token)"
        )
    return tokenizer, "compound word tokenizer (the source has none)"


def _wrapped_config(lm_config: PretrainedConfig, vision_preset: str) -> LlavaConfig:
    """The vision side exactly as the preset builds it; the text side is the source's config."""
    preset = get_preset(vision_preset)
    shape = llava_config(
        dataclasses.replace(preset, text={"vocab_size": lm_config.vocab_size}, training=None)
    )
    return LlavaConfig(
        vision_config=shape.vision_config,
        text_config=lm_config,
        image_token_index=shape.image_token_id,  # vocab_size - 1, as for cost-only presets
        image_seq_length=shape.image_seq_length,
        vision_feature_select_strategy=shape.vision_feature_select_strategy,
        vision_feature_layer=shape.vision_feature_layer,
        projector_hidden_act=shape.projector_hidden_act,
        tie_word_embeddings=bool(getattr(lm_config, "tie_word_embeddings", False)),
    )


def wrap_language_model(
    source: str | Path,
    out: str | Path,
    *,
    vision_from: str = DEFAULT_VISION_PRESET,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a LLaVA checkpoint at `out` around the causal LM at `source`; returns a summary.

    `source` is a directory transformers' AutoModelForCausalLM loads offline, or a `.gguf` file
    (dequantized by transformers; needs the gguf and accelerate packages). Its decoder layers
    must be Llama-shaped (self_attn.q/k/v_proj, mlp.gate/up_proj) so our transforms apply.

    The LM's weights are kept as stored (same values and dtype) as the language model and
    lm_head. The vision tower and projector are random (seeded by `seed`), shaped like preset
    `vision_from`'s tower, in the LM's dtype. The image token is the LM's last vocabulary id
    (vocab_size - 1), as for the cost-only presets: an id the embedding table already has, so
    no weight changes; its text meaning, if any, is lost inside prompts, which costs nothing
    since the random tower makes the model untrained anyway. The source's tokenizer is saved
    with it if it has one, else our word tokenizer. compound.json records trained=False, the
    source and the vision preset, so runs measure costs and never score accuracy.
    """
    source_path = Path(source).expanduser()
    out_path = Path(out).expanduser()
    _check_out(out_path)
    directory, extra = _source_location(source_path)
    lm_config = _load_config(directory, extra, source_path)
    _check_llama_family(_probe(lm_config, source_path), lm_config.model_type, source_path)
    config = _wrapped_config(lm_config, vision_from)
    tokenizer, tokenizer_origin = _load_tokenizer(
        directory, extra, source_path, lm_config.vocab_size
    )
    try:
        with _quiet_transformers():
            lm = AutoModelForCausalLM.from_pretrained(
                directory, local_files_only=True, **({"dtype": "auto"} | extra)
            )
    except Exception as error:  # safetensors, torch and transformers each raise their own kinds
        raise CompoundError(
            f"cannot load weights from {source_path}: {_first_line(error)}"
        ) from None
    lm.eval()
    dtype = next(lm.parameters()).dtype

    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    if type(model.model.language_model) is not type(lm.model):
        raise CompoundError(
            f"{source_path}: LLaVA would rebuild its decoder as "
            f"{type(model.model.language_model).__name__}, not {type(lm.model).__name__}"
        )
    model.model.language_model = lm.model  # a tied lm_head stays tied: one Parameter
    model.lm_head = lm.lm_head
    torch.manual_seed(seed)
    model.model.vision_tower = AutoModel.from_config(config.vision_config).to(dtype)
    model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config).to(dtype)
    model.eval()

    name = source_path.stem if extra else source_path.name
    bundle = ModelBundle(
        model, prompt_format_for(model, tokenizer), name, trained=False, source=str(source_path)
    )
    info = {
        "wrapped_from": str(source_path.resolve()),
        "vision_from": vision_from,
        "vision_seed": seed,
        "tokenizer": tokenizer_origin,
        "notes": f"{vision_from}-shaped vision tower and projector with random weights: "
        "measures costs; accuracy is not scored",
    }
    save_checkpoint(bundle, out_path, info)
    vision_params = count_parameters(model.model.vision_tower) + count_parameters(
        model.model.multi_modal_projector
    )
    return {
        "out": str(out_path),
        "source": str(source_path),
        "vision_from": vision_from,
        "seed": seed,
        "params": bundle.param_count(),
        "language_model_params": count_parameters(lm),
        "vision_params": vision_params,
        "dtype": str(dtype).removeprefix("torch."),
        "image_token_id": config.image_token_id,
        "image_tokens": bundle.prompts.image_tokens,
        "tokenizer": tokenizer_origin,
        "trained": False,
    }
