"""Modality routing (paper 2.3's conditional computation, where it is real). Lossless.

A text-only call takes a text-only path: the language model under its own causal-LM head
(transformers' `AutoModelForCausalLM` for the decoder's config, sharing the bundle's decoder
and `lm_head` modules, no copy), without the multimodal wrapper's checks, image-token
bookkeeping and output types. Calls with images take the full LLaVA path; inside it, LLaVA's
own generate() keeps its path for every step. Same modules, same arithmetic: identical logits.

Per-modality latency is in every run's summary (image and text requests apart), so the saving
shows where it happens: on text requests.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from models.bundle import ModelBundle
from optimizations.base import Transform, register

# LLaVA keyword arguments a text-only causal LM does not take.
_IMAGE_KWARGS = (
    "pixel_values",
    "image_sizes",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "mm_encoder_outputs",
)


def _has_images(kwargs: dict[str, Any]) -> bool:
    return any(kwargs.get(name) is not None for name in ("pixel_values", "mm_encoder_outputs"))


def text_only_model(bundle: ModelBundle) -> torch.nn.Module:
    """A causal LM over the bundle's own decoder and head (built on meta, then given them)."""
    with torch.device("meta"):
        text = AutoModelForCausalLM.from_config(bundle.language_model.config)
    text.model = bundle.language_model
    text.lm_head = bundle.lm_head
    text.generation_config = bundle.model.generation_config
    return text.eval()


def _routed_generate(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    if args or _has_images(kwargs):
        self.routing.inside_full_path = True
        try:
            return type(self).generate(self, *args, **kwargs)
        finally:
            self.routing.inside_full_path = False
    return self.routing.text.generate(**_text_kwargs(kwargs))


def _routed_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    if args or _has_images(kwargs) or self.routing.inside_full_path:
        return type(self).forward(self, *args, **kwargs)
    return self.routing.text(**_text_kwargs(kwargs))


def _text_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in kwargs.items() if name not in _IMAGE_KWARGS}


class _Routing:
    """The text path and whether a full-path generate() is running (its steps stay on it)."""

    def __init__(self, text: torch.nn.Module) -> None:
        self.text = text
        self.inside_full_path = False


@register
class ModalityRouting(Transform):
    name = "modality_routing"
    description = (
        "modality routing (paper 2.3): text-only requests run the language model alone under "
        "its causal-LM head, without the multimodal wrapper; image requests keep the full path"
    )
    targets = ("layers.*.attention", "layers.*.mlp", "lm_head")
    lossless = True
    tolerance = 0.0

    def apply_in_place(self, bundle: ModelBundle) -> None:
        model = bundle.model
        # A plain attribute, not a submodule: the text path's modules are already the model's.
        object.__setattr__(model, "routing", _Routing(text_only_model(bundle)))
        model.generate = types.MethodType(_routed_generate, model)
        # generate() checks its keyword arguments against forward's signature: keep it.
        forward = functools.wraps(type(model).forward)(
            lambda self, *args, **kwargs: _routed_forward(self, *args, **kwargs)
        )
        model.forward = types.MethodType(forward, model)
