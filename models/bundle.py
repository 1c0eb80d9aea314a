"""The ModelBundle: a LLaVA-style model, its prompt format, named module handles and metadata.

Transforms and per-module trackers find modules only through `handles()`, so one transform
works on every LLaVA-family model, ours or a checkpoint on disk.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from models.events import Events
from models.prompting import PromptFormat
from models.tokenizer import build_tokenizer


class BlockState(Protocol):
    """What a transform keeps from one request to the next (a cache of images seen). The
    harness begins it afresh before every measured block, so each block serves the same
    stream from the same start, and ends it after, when it reports (on `bundle.events`)."""

    def begin_block(self) -> None: ...

    def end_block(self) -> None: ...


@dataclass
class ModelBundle:
    model: LlavaForConditionalGeneration
    prompts: PromptFormat
    preset: str
    trained: bool
    source: str  # "preset", or the checkpoint directory it was loaded from
    metadata: dict[str, Any] = field(default_factory=dict)
    events: Events = field(default_factory=Events)  # what transforms report while serving
    block_states: list[BlockState] = field(default_factory=list)

    # --- named handles -------------------------------------------------------------------
    @property
    def vision_encoder(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def attention(self, layer: int) -> nn.Module:
        return self.decoder_layers[layer].self_attn

    def mlp(self, layer: int) -> nn.Module:
        return self.decoder_layers[layer].mlp

    def handles(self) -> dict[str, nn.Module]:
        """Disjoint named modules whose times and savings the harness attributes."""
        named: dict[str, nn.Module] = {
            "vision_encoder": self.vision_encoder,
            "projector": self.projector,
        }
        for i in range(len(self.decoder_layers)):
            named[f"layers.{i}.attention"] = self.attention(i)
            named[f"layers.{i}.mlp"] = self.mlp(i)
        named["lm_head"] = self.lm_head
        return named

    # --- facts ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def is_materialized(self) -> bool:
        return self.device.type != "meta"

    def param_count(self) -> int:
        return count_parameters(self.model)

    def describe(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "params": self.param_count(),
            "trained": self.trained,
            "source": self.source,
            "image_tokens": self.prompts.image_tokens,
            "decoder_layers": len(self.decoder_layers),
            **self.metadata,
        }

    def clone(self) -> ModelBundle:
        """A deep copy, so a transform can change it while the original stays the baseline."""
        return copy.deepcopy(self)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights once), valid on the meta device too."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def prompt_format_for(model: LlavaForConditionalGeneration, tokenizer=None) -> PromptFormat:
    config = model.config
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    if config.vision_feature_select_strategy == "full" and vision.model_type == "clip_vision_model":
        tokens += 1  # CLIP's CLS token is kept under the "full" strategy
    return PromptFormat(
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        image_token_id=config.image_token_id,
        image_tokens=tokens,
        image_size=vision.image_size,
    )
