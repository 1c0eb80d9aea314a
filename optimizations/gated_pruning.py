"""Gated dynamic attention pruning (paper 2.2) as a transform: learned gates skip key blocks.

The gates (`models.attention_gate`, SeerAttention-style, one per decoder layer) are trained
beforehand against the frozen model's attention, with `compound run --train-students`, and
cached beside the teacher; the model's own weights never change. While serving, each layer's
prefill computes only the key blocks its gate predicts at or above `threshold` of a query
block's attention, per head, through a FlexAttention BlockMask: that is how pruned weights
become saved work, and the fraction of causal blocks pruned is reported per layer call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.attention_gate import PRUNED_METRIC, GatedPrefill, ensure_gates, find_gates, load_gates
from models.bundle import ModelBundle
from models.sparse_attention import install
from optimizations.base import Figure, Transform, register
from optimizations.params import Param

PRUNED = Figure(PRUNED_METRIC, "causal key blocks the gate skipped", "fraction", "value")


@register
class GatedAttentionPruning(Transform):
    name = "gated_attention_pruning"
    description = (
        "gated dynamic attention pruning (paper 2.2): a learned gate per decoder layer skips "
        "the key blocks it predicts get under `threshold` of the attention (prefill)"
    )
    targets = ("layers.*.attention",)
    lossless = False
    tolerance = None
    requires = frozenset({"flex_attention", "materialized"})
    conflicts_with = frozenset({"block_sparse_attention", "sparse_finetune", "token_pruning"})
    figures = (PRUNED,)
    params = (
        Param(
            "threshold",
            float,
            0.03,
            "skip a key block predicted to get less than this share of a query block's "
            "attention (0: skip nothing; 0.03 chosen on small-hd's validation split)",
            low=0.0,
            high=1.0,
        ),
        Param(
            "block_size",
            int,
            16,
            "block size of the gate and the BlockMask",
            choices=(16, 32, 64, 128),
        ),
        Param("steps", int, 200, "gate training steps (8 image prompts each)", low=1, high=20_000),
    )

    def gate_settings(self) -> dict[str, Any]:
        return {"block_size": self.values["block_size"], "steps": self.values["steps"]}

    def cached_input(self, bundle: ModelBundle) -> Path:
        return find_gates(bundle, self.gate_settings())

    def prepare(self, bundle: ModelBundle, *, show_progress: bool = True) -> None:
        ensure_gates(bundle, self.gate_settings(), show_progress=show_progress)

    def apply_in_place(self, bundle: ModelBundle) -> None:
        gates, info = load_gates(bundle, self.cached_input(bundle))
        state = GatedPrefill(
            gates, self.values["threshold"], self.values["block_size"], bundle.events
        )
        install(bundle, state)
        bundle.metadata["gated_pruning"] = {**self.values, "gate": info}
