"""Memory-mapped, page-aligned weights (paper 3.1's storage alignment, as it exists). Lossless.

The paper's storage rows (parameter blocks aligned to ZNS storage zones, CXL memory sharing)
need hardware this project has not got; they stay declared modules in `compound formula`. What
a PyTorch server can do is load weights by memory-mapping a safetensors file whose tensors
start on page boundaries (`models.aligned_weights`) and keep the mapping, instead of copying
every tensor into the process's own memory (compound's default load). Loading then costs a
mapping, pages are read when first touched, and processes serving the same file share its
page-cache pages. `compound coldstart` measures what it changes: process start → weights
loaded → first token, in fresh processes with the weights' pages evicted.

In a worker the weights are loaded mapped from the start; applied to a model already loaded,
it maps the weights and drops the copies. It must come first (it replaces the weights'
storage, which earlier transforms may have rewritten). Needs a checkpoint on disk.
"""

from __future__ import annotations

import torch

from models.bundle import ModelBundle
from models.checkpoint import load_model_dir
from optimizations.base import Figure, Transform, register

MAPPED = Figure("mapped_weight_bytes", "weights served from the mapping", "bytes", "applied")


@register
class MmapLoad(Transform):
    name = "mmap_load"
    description = (
        "memory-mapped weights (paper 3.1): served from a mapping of a page-aligned "
        "safetensors copy instead of copied into process memory; see compound coldstart"
    )
    targets = ("*",)
    lossless = True
    tolerance = 0.0
    replaces_model = True
    load_options = {"mapped": True}
    conflicts_with = frozenset({"distill", "sparse_finetune"})
    figures = (MAPPED,)

    def check_requirements(self, bundle: ModelBundle) -> str | None:
        if bundle.source == "preset" and bundle.is_materialized:
            return (
                "needs its weights in a checkpoint on disk (a cost-only preset is built in "
                "memory; `compound coldstart` saves one to load)"
            )
        return None

    def apply_in_place(self, bundle: ModelBundle) -> dict[str, float]:
        if bundle.metadata.get("weights") != "mapped":
            mapped = load_model_dir(
                bundle.source, device=bundle.device, dtype=bundle.dtype, mapped=True
            ).model.state_dict()
            with torch.no_grad():
                for name, tensor in bundle.model.state_dict(keep_vars=True).items():
                    if name in mapped:
                        tensor.data = mapped[name]
            bundle.metadata["weights"] = "mapped"
        on_cpu = [p for p in bundle.model.parameters() if p.device.type == "cpu"]
        return {MAPPED.metric: float(sum(p.numel() * p.element_size() for p in on_cpu))}
