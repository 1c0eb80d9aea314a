"""Block-sparse attention served by weights fine-tuned under its mask (paper 2.2, SparseFinetune).

The fine-tune (`models.sparse_finetune`: per-head gradient compensation, a fixed budget of
steps) runs beforehand, with `compound run --train-students`, and is cached beside the teacher;
this transform loads those weights in the bundle's place and serves them with the same
block-sparse attention as `block_sparse_attention`. It replaces the model, so it comes first.
"""

from __future__ import annotations

from pathlib import Path

from models.bundle import ModelBundle
from models.sparse_attention import PATTERNS
from models.sparse_finetune import (
    SparseFinetuneRecipe,
    ensure_finetuned,
    find_finetuned,
    load_finetuned,
)
from optimizations.base import Transform, register
from optimizations.block_sparse import SPARSITY, WORK, BlockSparseAttention
from optimizations.params import Param


@register
class SparseFinetune(Transform):
    name = "sparse_finetune"
    description = (
        "block-sparse attention on weights fine-tuned under its mask, with per-head gradient "
        "compensation (paper 2.2 SparseFinetune); train with --train-students"
    )
    targets = ("*",)  # every decoder weight may change
    lossless = False
    tolerance = None
    requires = frozenset({"flex_attention", "materialized"})
    conflicts_with = frozenset({"block_sparse_attention", "token_pruning"})
    replaces_model = True
    figures = (SPARSITY, WORK)
    params = (
        Param(
            "pattern",
            str,
            "local",
            "block-sparse pattern (as block_sparse_attention)",
            choices=PATTERNS,
        ),
        Param("window", int, 32, "local pattern: image tokens seen", low=1, high=1_000_000),
        Param("block_size", int, 16, "BlockMask block size", choices=(16, 32, 64, 128)),
        Param("steps", int, 150, "fine-tuning steps", low=1, high=20_000),
        Param(
            "compensation",
            float,
            1.0,
            "exponent of the per-head gradient weights (0: a plain fine-tune)",
            low=0.0,
            high=4.0,
        ),
    )

    def recipe(self) -> SparseFinetuneRecipe:
        return SparseFinetuneRecipe(**self.values)

    def cached_input(self, bundle: ModelBundle) -> Path:
        return find_finetuned(bundle, self.recipe())

    def prepare(self, bundle: ModelBundle, *, show_progress: bool = True) -> None:
        ensure_finetuned(bundle, self.recipe(), show_progress=show_progress)

    def apply_in_place(self, bundle: ModelBundle) -> None:
        tuned = load_finetuned(self.cached_input(bundle), device=bundle.device, dtype=bundle.dtype)
        bundle.model = tuned.model
        bundle.source = tuned.source
        bundle.metadata["sparse_finetune"] = tuned.metadata.get("sparse_finetune", {})
        serving = BlockSparseAttention(
            pattern=self.values["pattern"],
            window=self.values["window"],
            block_size=self.values["block_size"],
        )
        serving.apply_in_place(bundle)
