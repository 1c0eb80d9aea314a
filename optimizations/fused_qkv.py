"""Fused projections: one GEMM for each attention's q/k/v (and each MLP's gate/up) instead of
three (two): a deliberate micro-optimization expected to save about 1-3%.

The attention and MLP forwards are left exactly as transformers wrote them. Their `q_proj`,
`k_proj`, `v_proj` (`gate_proj`, `up_proj`) become parameter-free `LinearPart`s over one
`FusedLinear` (`qkv_proj`, `gate_up_proj`): the first part called with an input runs the single
GEMM for all parts and the others return their column slice of that output. GQA (k/v narrower
than q) is just parts of different widths. FLOPs and weight bytes are unchanged; what is saved
is kernel launches, passes over the input and per-call overhead.

Lossless within float tolerance: the same dot products, but a wider GEMM may block and
accumulate them in another order.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn
from torch.nn import functional as F

from core.errors import CompoundError
from models.bundle import ModelBundle
from optimizations.base import Transform, register
from optimizations.params import Param


class FusedLinear(nn.Module):
    """The rows of several Linear layers with the same input, stacked into one weight."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        has_bias = {linear.bias is not None for linear in linears}
        if len(has_bias) != 1:
            raise ValueError("cannot fuse linears where only some have a bias")
        self.weight = nn.Parameter(torch.cat([linear.weight.data for linear in linears]))
        biases = [linear.bias.data for linear in linears] if has_bias == {True} else None
        self.bias = nn.Parameter(torch.cat(biases)) if biases else None
        ends = list(accumulate(linear.out_features for linear in linears))
        self.bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        self.in_features = linears[0].in_features
        self._pending: tuple[torch.Tensor, torch.Tensor, set[int]] | None = None

    def output_for(self, x: torch.Tensor, part: int) -> torch.Tensor:
        """Part `part` of the fused output for `x`: one GEMM serves all parts of one input."""
        pending = self._pending
        if pending is None or pending[0] is not x or part in pending[2]:
            pending = (x, F.linear(x, self.weight, self.bias), set())
        pending[2].add(part)
        # Drop the cached output once every part has taken its slice.
        self._pending = None if len(pending[2]) == len(self.bounds) else pending
        start, end = self.bounds[part]
        return pending[1][..., start:end]

    def extra_repr(self) -> str:
        widths = [end - start for start, end in self.bounds]
        return f"in_features={self.in_features}, parts={widths}, bias={self.bias is not None}"


class LinearPart(nn.Module):
    """Stands in for one fused Linear: same call, `weight` and `bias` as views, no parameters."""

    def __init__(self, fused: FusedLinear, part: int) -> None:
        super().__init__()
        # Not a submodule: the fused layer belongs to the attention/MLP, once.
        object.__setattr__(self, "fused", fused)
        self.part = part
        self.in_features = fused.in_features
        start, end = fused.bounds[part]
        self.out_features = end - start

    @property
    def weight(self) -> torch.Tensor:
        start, end = self.fused.bounds[self.part]
        return self.fused.weight[start:end]

    @property
    def bias(self) -> torch.Tensor | None:
        start, end = self.fused.bounds[self.part]
        return None if self.fused.bias is None else self.fused.bias[start:end]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output_for(x, self.part)

    def extra_repr(self) -> str:
        return f"part {self.part} of a fused linear, out_features={self.out_features}"


def fuse(module: nn.Module, parts: tuple[str, ...], fused_name: str) -> None:
    """Replace `module`'s Linear children `parts` by slices of one new `fused_name` Linear."""
    fused = FusedLinear([getattr(module, name) for name in parts])
    setattr(module, fused_name, fused)
    for index, name in enumerate(parts):
        setattr(module, name, LinearPart(fused, index))


def _check_linears(module: nn.Module, parts: tuple[str, ...], where: str) -> None:
    for name in parts:
        if type(getattr(module, name, None)) is not nn.Linear:
            raise CompoundError(
                f"transform fused_qkv: {where}.{name} is not a plain nn.Linear "
                "(already fused, quantized, or not a Llama-style module)"
            )


ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj")
MLP_PARTS = ("gate_proj", "up_proj")


@register
class FusedQKV(Transform):
    name = "fused_qkv"
    description = (
        "micro-optimization: one GEMM for each attention's q/k/v projections "
        "(and each MLP's gate/up), lossless within float rounding"
    )
    targets = ("layers.*.attention", "layers.*.mlp")
    lossless = True
    tolerance = 1e-4  # float32 |logit| difference from GEMM reassociation (0.0 measured on CPU)
    params = (Param("fuse_mlp", bool, True, "also fuse each MLP's gate_proj and up_proj"),)

    def target_handles(self, bundle: ModelBundle) -> list[str]:
        kinds = ("attention", "mlp") if self.values["fuse_mlp"] else ("attention",)
        return [f"layers.{i}.{kind}" for i in range(len(bundle.decoder_layers)) for kind in kinds]

    def validate_for(self, bundle: ModelBundle) -> None:
        super().validate_for(bundle)
        for i in range(len(bundle.decoder_layers)):
            _check_linears(bundle.attention(i), ATTENTION_PARTS, f"layers.{i}.attention")
            if self.values["fuse_mlp"]:
                _check_linears(bundle.mlp(i), MLP_PARTS, f"layers.{i}.mlp")

    def apply_in_place(self, bundle: ModelBundle) -> None:
        for i in range(len(bundle.decoder_layers)):
            fuse(bundle.attention(i), ATTENTION_PARTS, "qkv_proj")
            if self.values["fuse_mlp"]:
                fuse(bundle.mlp(i), MLP_PARTS, "gate_up_proj")
