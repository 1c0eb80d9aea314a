"""Low-precision softmax in the decoder's attention (paper 3.4, "SOFTMAX_APPROX"). Lossy.

The paper names an instruction that no public ISA has; what runs is the softmax in bfloat16 or
float16, optionally with a polynomial exponential (`models.approx_softmax`), while the scores,
the weighted sum and everything else keep the model's dtype. The attention becomes an explicit
scores → softmax → sum (the fused SDPA kernel has no reduced-precision softmax to ask for), so on
a float32 CPU model it can cost time rather than save it; the suite measures which.

Stated logit tolerance: `LOGIT_TOLERANCE`, the largest |logit difference| from the unchanged
model that a test allows on the trained `tiny` model for every setting; accuracy is measured.
"""

from __future__ import annotations

import torch

from core.errors import CompoundError
from models.approx_softmax import EXP_KINDS, SOFTMAX_DTYPES, register_attention
from models.bundle import ModelBundle
from optimizations.base import Transform, register
from optimizations.params import Param

LOGIT_TOLERANCE = 0.25


@register
class ApproxSoftmax(Transform):
    name = "approx_softmax"
    description = (
        "low-precision softmax (paper 3.4's SOFTMAX_APPROX): each decoder attention's softmax "
        "in bfloat16/float16, optionally with a polynomial exp; the rest keeps its dtype"
    )
    targets = ("layers.*.attention",)
    lossless = False
    tolerance = None
    conflicts_with = frozenset({"block_sparse_attention", "gated_attention_pruning"})
    params = (
        Param("dtype", str, "bfloat16", "the softmax's dtype", choices=SOFTMAX_DTYPES),
        Param(
            "exp",
            str,
            "exact",
            "exact: torch.exp in that dtype; poly: 2^n·p(f) with a cubic p (rel. error < 1e-4)",
            choices=EXP_KINDS,
        ),
    )

    def validate_for(self, bundle: ModelBundle) -> None:
        super().validate_for(bundle)
        implementation = getattr(bundle.language_model.config, "_attn_implementation", None)
        if implementation not in ("sdpa", "eager"):
            raise CompoundError(
                f"transform {self.name}: needs the decoder on sdpa or eager attention, not "
                f"{implementation!r}"
            )

    def apply_in_place(self, bundle: ModelBundle) -> None:
        settings = (getattr(torch, self.values["dtype"]), self.values["exp"])
        bundle.language_model.config._attn_implementation = register_attention()
        for index in range(len(bundle.decoder_layers)):
            bundle.attention(index).approx_softmax_settings = settings
