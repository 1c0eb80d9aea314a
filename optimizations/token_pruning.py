"""Visual-token pruning as dynamic sparse activation (paper 2.2, FastV-style). Lossy.

Prompts are `<bos> question <image>×N <sep>`, so the only text token that can attend to the
image (causally) is the last prompt token. During the prefill of an image request, just before
decoder layer K, we score each image token by the attention the last prompt token would pay it
*in layer K itself* (softmax over the whole prompt, averaged over heads), and drop the lowest:
keep ceil(keep_ratio·N), or, with `threshold`, those whose score is at least the threshold.
Scoring in layer K (not K−1) needs only the hidden states entering layer K, so it is
self-contained and works for K = 0; it costs one query row and layer K's key projection over the
prompt (recomputed; layer K then projects only the kept tokens).

How it runs through HF generate() with a KV cache, with no change to transformers' code:
- a forward pre-hook on the model sees `input_ids` and whether the cache is empty, and so knows
  whether a call is an image prefill, a decode step that follows one, or something else;
- a forward pre-hook on layer K slices the hidden states, position ids, rotary cos/sin and the
  attention mask to the kept positions; pre-hooks on layers after K slice the same arguments.
  Kept tokens keep their original positions (RoPE), as in FastV.
- Layers < K cache all S prompt positions, layers ≥ K cache only the kept ones. The cache's
  length (read from layer 0) stays S, so generate's positions stay right; in decode steps the
  hooks remove the dropped columns from the attention mask of layers ≥ K, when there is one.

Saved: in prefill, layers ≥ K process S − dropped tokens (every projection, MLP and attention);
in decode, layers ≥ K attend over a KV cache shorter by `dropped`, and those layers' cache
memory shrinks by the same. Not saved: the vision tower, projector and layers < K; scoring and
the gathers add a little work. Logits exist only for kept positions (the last one is always
kept). Requests without image tokens are untouched. Needs a Llama-style decoder (input_layernorm,
q_proj/k_proj, RoPE position embeddings passed to each layer) and a tensor or absent attention
mask (sdpa, eager; not flex/flash attention) and generate()'s default DynamicCache (other caches
are refused with an error); a batch is pruned only if all its rows hold the same number of image
tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from core.errors import CompoundError
from models.bundle import ModelBundle
from optimizations.base import Figure, Transform, register
from optimizations.params import Param

KEPT = Figure("pruning_kept_fraction", "image tokens kept", "fraction", "value")


def _take(tensor: torch.Tensor, keep: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`tensor` gathered along `dim` at per-row positions `keep` (batch, kept)."""
    batch = keep.shape[0]
    if tensor.shape[0] != batch:
        tensor = tensor.expand(batch, *tensor.shape[1:])
    index = keep.view(batch, *([1] * (dim - 1)), keep.shape[1], *([1] * (tensor.dim() - dim - 1)))
    sizes = list(tensor.shape)
    sizes[dim] = keep.shape[1]
    return tensor.gather(dim, index.expand(sizes))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding; x is (batch, heads, seq, dim), cos/sin (batch, seq, dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def last_token_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """(batch, seq): the last position's attention over the prompt in `layer`, head-averaged."""
    attention = layer.self_attn
    head_dim = attention.head_dim
    states = layer.input_layernorm(hidden)
    batch, seq, _ = states.shape
    q_proj, k_proj = attention.q_proj, attention.k_proj
    query = F.linear(states[:, -1:], q_proj.weight, q_proj.bias)
    key = F.linear(states, k_proj.weight, k_proj.bias)
    query = query.view(batch, 1, -1, head_dim).transpose(1, 2)
    key = key.view(batch, seq, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query = _rope(query, cos[:, -1:], sin[:, -1:])
    key = _rope(key, cos, sin).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scaling = getattr(attention, "scaling", head_dim**-0.5)
    scores = (query @ key.transpose(-1, -2)).float() * scaling  # (batch, heads, 1, seq)
    if mask is not None:
        row = mask[:, :, -1:, :seq]
        scores = scores.masked_fill(~row, -math.inf) if row.dtype == torch.bool else scores + row
    return scores.softmax(dim=-1).mean(dim=1).squeeze(1)


class _Pruner:
    """Per-call state and the hooks; its bound methods are the hooks, so clones stay consistent."""

    def __init__(self, bundle: ModelBundle, layer: int, keep_ratio: float, threshold: float | None):
        self.events = bundle.events
        self.image_token_id = bundle.model.config.image_token_id
        self.first = bundle.decoder_layers[layer]
        self.keep_ratio = keep_ratio
        self.threshold = threshold
        self.phase = "off"  # "prefill" (image prompt, empty cache), "decode" (after one) or "off"
        self.image_mask: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None  # (batch, kept) prompt positions kept at layer K
        self.prompt_length = 0
        self.record: dict[str, Any] = {
            "layer": layer,
            "keep_ratio": keep_ratio,
            "threshold": threshold,
            "layers_pruned": len(bundle.decoder_layers) - layer,
            "scoring": f"last prompt token's head-averaged attention in layer {layer}",
            "requests": [],
            "skipped": 0,
        }

    # --- the model call: which phase is this? ------------------------------------------------
    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and not isinstance(cache, DynamicCache):
            raise CompoundError(
                f"transform token_pruning: needs a DynamicCache, got {type(cache).__name__} "
                "(a fixed-size cache would keep the dropped positions)"
            )
        past = cache.get_seq_length() if cache is not None else 0
        if past > 0 and self.phase in ("prefill", "decode") and self.keep is not None:
            self.phase = "decode"
            return
        self.phase, self.keep = "off", None
        if ids is None or past > 0 or ids.shape[1] < 2:
            return
        image = ids == self.image_token_id
        counts = image.sum(dim=1)
        if not bool(counts.any()):
            return
        if bool((counts != counts[0]).any()):
            self.record["skipped"] += 1  # rows with different image-token counts
            return
        self.phase, self.image_mask, self.prompt_length = "prefill", image, ids.shape[1]

    # --- the layers --------------------------------------------------------------------------
    def before_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self.phase == "prefill" and module is self.first:
            self._choose(module, args[0] if args else kwargs["hidden_states"], kwargs)
        if self.keep is None or self.phase == "off":
            return None
        if self.phase == "decode":
            kwargs["attention_mask"] = self._decode_mask(kwargs.get("attention_mask"))
            return args, kwargs
        if module is self.first:
            if args:
                args = (_take(args[0], self.keep), *args[1:])
            else:
                kwargs["hidden_states"] = _take(kwargs["hidden_states"], self.keep)
        return args, self._prefill_kwargs(kwargs)

    def _choose(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> None:
        mask = _tensor_mask(kwargs.get("attention_mask"))
        scores = last_token_attention(layer, hidden, kwargs["position_embeddings"], mask)
        image = self.image_mask.to(scores.device)
        total = int(image[0].sum())
        if self.threshold is None:
            kept = math.ceil(self.keep_ratio * total - 1e-9)
        else:
            above = ((scores >= self.threshold) & image).sum(dim=1)
            kept = max(1, int(above.max()))
        self.events.value(KEPT.metric, kept / total, KEPT.unit)
        self.record["requests"].append(
            {
                "image_tokens": total,
                "kept": kept,
                "dropped": total - kept,
                "prompt_tokens": self.prompt_length,
                "pruned_prompt_tokens": self.prompt_length - total + kept,
            }
        )
        if kept >= total:
            self.phase = "off"  # nothing to drop: leave every layer as it is
            return
        top = scores.masked_fill(~image, -math.inf).topk(kept, dim=1).indices
        keep = (~image).scatter(1, top, True)
        self.keep = keep.nonzero()[:, 1].view(keep.shape[0], -1)

    def _prefill_kwargs(self, kwargs: dict) -> dict:
        keep = self.keep
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = tuple(
                _take(t, keep) for t in kwargs["position_embeddings"]
            )
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _take(kwargs["position_ids"], keep)
        if kwargs.get("cache_position") is not None:  # older 5.x pass it; DynamicCache ignores it
            kwargs["cache_position"] = kwargs["cache_position"][keep[0]]
        mask = _tensor_mask(kwargs.get("attention_mask"))
        if mask is not None:
            kwargs["attention_mask"] = _take(_take(mask, keep, dim=2), keep, dim=3)
        return kwargs

    def _decode_mask(self, mask: Any) -> torch.Tensor | None:
        mask = _tensor_mask(mask)
        if mask is None:
            return None
        batch, length = self.keep.shape[0], mask.shape[-1]
        recent = torch.arange(self.prompt_length, length, device=mask.device)
        columns = torch.cat([self.keep.to(mask.device), recent.expand(batch, -1)], dim=1)
        return _take(mask, columns, dim=3)


def _tensor_mask(mask: Any) -> torch.Tensor | None:
    if mask is None or isinstance(mask, torch.Tensor):
        return mask
    raise CompoundError(
        f"transform token_pruning: unsupported attention mask {type(mask).__name__} "
        "(use the sdpa or eager attention implementation)"
    )


@register
class VisualTokenPruning(Transform):
    name = "token_pruning"
    description = (
        "visual-token pruning (paper 2.2, FastV-style): before decoder layer K, drop the image "
        "tokens the last prompt token attends to least; layers >= K never see them"
    )
    targets = ("layers.*.attention", "layers.*.mlp")
    lossless = False
    tolerance = None
    engines = frozenset({"eager"})
    engine_reason = (
        "its layers after K cache fewer positions than the prompt, which needs generate()'s "
        "DynamicCache; a static cache (and a captured graph) has one fixed length per layer"
    )
    figures = (KEPT,)
    params = (
        Param(
            "layer",
            int,
            None,
            "K: the first decoder layer that sees only kept tokens (default: half the depth)",
            low=0,
            nullable=True,
        ),
        Param(
            "keep_ratio",
            float,
            0.5,
            "fraction of image tokens kept (ceil(keep_ratio·N)); ignored with a threshold",
            low=0.0,
            high=1.0,
            low_open=True,
        ),
        Param(
            "threshold",
            float,
            None,
            "keep image tokens whose head-averaged attention is at least this (at least one)",
            low=0.0,
            high=1.0,
            nullable=True,
        ),
    )

    def first_layer(self, bundle: ModelBundle) -> int:
        """K as given, else half the decoder's depth (FastV prunes early; a small model needs
        a few layers to rank the image tokens)."""
        chosen = self.values["layer"]
        return len(bundle.decoder_layers) // 2 if chosen is None else chosen

    def target_handles(self, bundle: ModelBundle) -> list[str]:
        first = self.first_layer(bundle)
        return [
            f"layers.{i}.{kind}"
            for i in range(first, len(bundle.decoder_layers))
            for kind in ("attention", "mlp")
        ]

    def validate_for(self, bundle: ModelBundle) -> None:
        layers = len(bundle.decoder_layers)
        first = self.first_layer(bundle)
        if first >= layers:
            raise CompoundError(
                f"transform {self.name}: parameter 'layer' must be < the number of decoder "
                f"layers ({layers}), got {first}"
            )
        layer = bundle.decoder_layers[first]
        attention = bundle.attention(first)
        needed = [
            (layer, "input_layernorm"),
            (attention, "q_proj"),
            (attention, "k_proj"),
            (attention, "head_dim"),
        ]
        missing = [name for owner, name in needed if not hasattr(owner, name)]
        if missing:
            raise CompoundError(
                f"transform {self.name}: decoder layer is not Llama-style (no {', '.join(missing)})"
            )
        super().validate_for(bundle)

    def apply_in_place(self, bundle: ModelBundle) -> None:
        first = self.first_layer(bundle)
        pruner = _Pruner(bundle, first, self.values["keep_ratio"], self.values["threshold"])
        bundle.metadata["pruning"] = pruner.record
        bundle.model.register_forward_pre_hook(pruner.on_model_call, with_kwargs=True)
        for layer in bundle.decoder_layers[first:]:
            layer.register_forward_pre_hook(pruner.before_layer, with_kwargs=True)
