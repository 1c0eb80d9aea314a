"""2:4 semi-structured sparse GEMMs in the decoder's linears (paper 3.4, "SPARSE_GEMM"). Lossy.

Each chosen linear is magnitude-pruned to two non-zeros in every four consecutive inputs
(`models.semi_structured`), then, with `kernel` "semi_structured", runs on NVIDIA's sparse
tensor cores (float16/bfloat16, compute capability 8.0+); on anything else that kernel is
skipped with the reason. `kernel` "dense" keeps the pruned weights dense: it runs anywhere and
measures the accuracy cost of the pruning alone, with no saving to expect. No fine-tune follows
the pruning here (the issue's optional recovery step is not built).
"""

from __future__ import annotations

from torch import nn

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.semi_structured import (
    GROUP,
    SemiStructuredLinear,
    device_problem,
    prune_24,
    shape_problem,
)
from optimizations.base import Figure, Transform, register
from optimizations.params import Param

LINEARS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
KERNELS = ("semi_structured", "dense")
PRUNED = Figure(
    "pruned_weight_fraction", "weights zeroed in the pruned linears", "fraction", "applied"
)
SPARSE_LAYERS = Figure(
    "sparse_kernel_linears", "linears on the 2:4 sparse kernel", "count", "applied"
)
DENSE_LAYERS = Figure(
    "dense_fallback_linears", "pruned linears left dense (shape unsupported)", "count", "applied"
)


@register
class SparseGemm24(Transform):
    name = "sparse_gemm_24"
    description = (
        "2:4 semi-structured sparsity (paper 3.4's SPARSE_GEMM): magnitude-prune decoder "
        "linears to 2 of every 4 weights and run them on sparse tensor cores (CUDA, fp16/bf16)"
    )
    targets = ("layers.*.attention", "layers.*.mlp")
    lossless = False
    tolerance = None
    figures = (PRUNED, SPARSE_LAYERS, DENSE_LAYERS)
    params = (
        Param("layers", str, "mlp", "which decoder linears", choices=("mlp", "attention", "all")),
        Param(
            "kernel",
            str,
            "semi_structured",
            "semi_structured: sparse tensor cores (CUDA only); dense: pruned weights run dense "
            "(accuracy cost only)",
            choices=KERNELS,
        ),
    )

    def _kinds(self) -> tuple[str, ...]:
        chosen = self.values["layers"]
        return ("attention", "mlp") if chosen == "all" else (chosen,)

    def _linears(self, bundle: ModelBundle) -> list[tuple[nn.Module, str]]:
        found = []
        for index in range(len(bundle.decoder_layers)):
            for kind in self._kinds():
                module = bundle.attention(index) if kind == "attention" else bundle.mlp(index)
                found.extend((module, name) for name in LINEARS[kind])
        return found

    def target_handles(self, bundle: ModelBundle) -> list[str]:
        return [
            f"layers.{index}.{kind}"
            for index in range(len(bundle.decoder_layers))
            for kind in self._kinds()
        ]

    def check_requirements(self, bundle: ModelBundle) -> str | None:
        if self.values["kernel"] == "dense" or not bundle.is_materialized:
            return None
        return device_problem(bundle.device, bundle.dtype)

    def validate_for(self, bundle: ModelBundle) -> None:
        super().validate_for(bundle)
        for module, name in self._linears(bundle):
            linear = getattr(module, name, None)
            if type(linear) is not nn.Linear:
                raise CompoundError(
                    f"transform {self.name}: {name} is not a plain nn.Linear (already fused, "
                    "pruned or quantized?)"
                )
            if linear.in_features % GROUP:
                raise CompoundError(
                    f"transform {self.name}: {name} has {linear.in_features} inputs, not a "
                    f"multiple of {GROUP}"
                )

    def apply_in_place(self, bundle: ModelBundle) -> dict[str, float]:
        zeros = total = sparse = fallback = 0
        for module, name in self._linears(bundle):
            linear = getattr(module, name)
            prune_24(linear)
            zeros += int((linear.weight == 0).sum())
            total += linear.weight.numel()
            if self.values["kernel"] == "dense":
                continue
            if shape_problem(tuple(linear.weight.shape), bundle.dtype) is None:
                setattr(module, name, SemiStructuredLinear(linear))
                sparse += 1
            else:
                fallback += 1
        return {
            PRUNED.metric: zeros / total,
            SPARSE_LAYERS.metric: sparse,
            DENSE_LAYERS.metric: fallback,
        }
