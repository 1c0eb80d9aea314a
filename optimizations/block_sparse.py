"""Block-sparse attention (paper 2.2, sparse activation) in the decoder's prefill. Lossy.

Each decoder attention layer computes, in the prefill, only the key blocks its pattern allows
(`models.sparse_attention`: local windows over image tokens, global text tokens, one image's
tokens blind to another's), through a FlexAttention BlockMask and compiled FlexAttention.
Decode steps (one query, a text token, which attends to everything) keep SDPA, so the saving is
in the prefill's attention alone; projections, MLPs and the vision tower are untouched.

How much is skipped is reported per prefill: the block sparsity in FlexAttention's terms (blocks
skipped out of the whole padded S × S grid) and the work fraction (blocks computed out of those
a dense causal kernel computes; causal attention alone already skips about half the grid).
"""

from __future__ import annotations

from typing import Any

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.sparse_attention import PATTERNS, BlockSparsePrefill, install
from optimizations.base import Figure, Transform, register
from optimizations.params import Param

SPARSITY = Figure("attention_block_sparsity", "blocks skipped of the S×S grid", "fraction", "value")
WORK = Figure(
    "attention_work_fraction", "blocks computed / dense causal blocks", "fraction", "value"
)


class _Reporter(BlockSparsePrefill):
    """The prefill state that also says, per prefill, how sparse its block mask is."""

    def __init__(self, events: Any, record: dict[str, Any], **settings: Any) -> None:
        super().__init__(**settings)
        self.events = events
        self.record = record

    def on_model_call(self, module: Any, args: tuple, kwargs: dict) -> None:
        super().on_model_call(module, args, kwargs)
        stats = self.current_stats
        if stats is None:
            return
        self.events.value(SPARSITY.metric, stats.sparsity, SPARSITY.unit)
        self.events.value(WORK.metric, stats.work_fraction, WORK.unit)
        self.record["prefills"] += 1
        self.record["last"] = {
            "prompt_tokens": self.length,
            "block_sparsity": stats.sparsity,
            "work_fraction": stats.work_fraction,
            "allowed_pair_fraction": stats.allowed_pairs / max(1, stats.causal_pairs),
        }


@register
class BlockSparseAttention(Transform):
    name = "block_sparse_attention"
    description = (
        "block-sparse attention (paper 2.2): in the prefill each decoder layer computes only "
        "the key blocks of its pattern (local image windows, global text), by FlexAttention"
    )
    targets = ("layers.*.attention",)
    lossless = False
    tolerance = None
    requires = frozenset({"flex_attention"})
    conflicts_with = frozenset({"token_pruning"})
    figures = (SPARSITY, WORK)
    params = (
        Param(
            "pattern",
            str,
            "local",
            "local: image tokens see a window of their image + all text; per_image: their "
            "whole image + text; causal: dense (0% extra sparsity, the control)",
            choices=PATTERNS,
        ),
        Param(
            "window",
            int,
            32,
            "local pattern: image tokens each image token sees, itself included (raster order)",
            low=1,
            high=1_000_000,
        ),
        Param(
            "block_size",
            int,
            16,
            "square block of the BlockMask, in tokens (FlexAttention needs a multiple of 16)",
            choices=(16, 32, 64, 128),
        ),
    )

    def validate_for(self, bundle: ModelBundle) -> None:
        super().validate_for(bundle)
        config = bundle.language_model.config
        if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
            raise CompoundError(
                f"transform {self.name}: needs the decoder on sdpa or eager attention, not "
                f"{config._attn_implementation!r}"
            )

    def apply_in_place(self, bundle: ModelBundle) -> None:
        record: dict[str, Any] = {**self.values, "prefills": 0, "last": None}
        state = _Reporter(
            bundle.events,
            record,
            image_token_id=bundle.model.config.image_token_id,
            image_tokens=bundle.prompts.image_tokens,
            pattern=self.values["pattern"],
            window=self.values["window"],
            block_size=self.values["block_size"],
        )
        install(bundle, state)
        bundle.metadata["block_sparse"] = record
