"""2:4 semi-structured sparsity (paper 3.4's SPARSE_GEMM, as it exists): magnitude pruning to
two non-zeros in every four consecutive input weights, and linears that run the pruned weight
on NVIDIA's sparse tensor cores through `torch.sparse.to_sparse_semi_structured`.

The paper names an instruction no public ISA has; NVIDIA GPUs from Ampere (compute capability
8.0) on have 2:4 sparse tensor-core GEMMs, which PyTorch exposes for float16/bfloat16 weights
of at least a minimum shape (`semi_structured_problem`). Everywhere else the pruned weight can
only run dense, which keeps the accuracy cost measurable and saves nothing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

GROUP, KEPT = 4, 2  # two non-zeros in every four consecutive weights along the input
SPARSE_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask of `weight` (out × in, in divisible by 4) keeping, in each group of four
    consecutive inputs of a row, the two of largest magnitude (the earlier one on a tie)."""
    rows, columns = weight.shape
    if columns % GROUP:
        raise ValueError(f"2:4 needs input features divisible by {GROUP}, got {columns}")
    groups = weight.detach().abs().float().reshape(rows, columns // GROUP, GROUP)
    # A stable sort keeps the earlier weight first among equals, so ties are deterministic.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., :KEPT], True)
    return mask.reshape(rows, columns)


def prune_24(linear: nn.Linear) -> None:
    """Zero `linear`'s weights outside its 2:4 mask, in place."""
    with torch.no_grad():
        linear.weight.mul_(mask_24(linear.weight))


def _backend() -> type:
    """The class `to_sparse_semi_structured` will build: cuSPARSELt where torch has it."""
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def device_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why 2:4 sparse GEMMs cannot run on `device` in `dtype`, or None."""
    if device.type != "cuda":
        return f"2:4 sparse GEMMs need an NVIDIA GPU of compute capability 8.0+ (on {device.type})"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"2:4 sparse GEMMs need compute capability 8.0+ (this GPU has {capability})"
    if dtype not in SPARSE_DTYPES:
        return f"2:4 sparse GEMMs here take float16 or bfloat16 weights, not {dtype}"
    return None


def shape_problem(weight_shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    """Why a weight of this shape cannot become semi-structured, or None."""
    rows, columns = weight_shape
    limits = _backend()._DTYPE_SHAPE_CONSTRAINTS[dtype]
    if rows % limits.sparse_min_rows or columns % limits.sparse_min_cols:
        return (
            f"weight {rows}×{columns} is not a multiple of "
            f"{limits.sparse_min_rows}×{limits.sparse_min_cols}"
        )
    return None


class SemiStructuredLinear(nn.Module):
    """A Linear whose (already 2:4-pruned) weight is a semi-structured sparse tensor."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(
            to_sparse_semi_structured(linear.weight.detach()), requires_grad=False
        )
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        return F.linear(rows, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 sparse"
