"""Time each decoder linear shape of a preset dense against 2:4 semi-structured sparse.

The issue asks for the per-layer speed of `sparse_gemm_24` at the model's own shapes: the
(out × in) of q/k/v/o and gate/up/down, at the token counts a prefill and a decode step feed
them. CUDA only (the sparse kernel exists nowhere else): CUDA events around `calls` calls, the
two kernels interleaved in a shuffled order each round, median per-round ratio with a bootstrap
interval over rounds (one process: read differences under 5% as none). Random weights pruned to
2:4; the kernel's time does not depend on their values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.measure.interleaved import interleaved_rounds, median_ratio
from models.presets import Preset
from models.semi_structured import SemiStructuredLinear, prune_24, shape_problem


@dataclass(frozen=True)
class GemmTiming:
    linears: str  # the projections of this shape, e.g. "gate_proj, up_proj"
    out_features: int
    in_features: int
    tokens: int
    dense_ms: float
    sparse_ms: float
    speedup: float  # dense / sparse, median over rounds
    speedup_low: float
    speedup_high: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear_shapes(preset: Preset) -> dict[tuple[int, int], list[str]]:
    """Distinct (out, in) weight shapes of the decoder's linears → the projections using them."""
    text = preset.text
    hidden, inner = text["hidden_size"], text["intermediate_size"]
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim", hidden // heads)
    kv = text.get("num_key_value_heads", heads) * head_dim
    named = {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inner, hidden),
        "up_proj": (inner, hidden),
        "down_proj": (hidden, inner),
    }
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, shape in named.items():
        shapes.setdefault(shape, []).append(name)
    return shapes


def _time(function: Any, calls: int) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        function()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / calls


@torch.inference_mode()
def time_shape(
    shape: tuple[int, int],
    names: list[str],
    tokens: int,
    dtype: torch.dtype,
    *,
    rounds: int,
    calls: int,
    seed: int = 0,
) -> GemmTiming | str:
    """The timing, or why this shape cannot run sparse (too small for the kernel)."""
    problem = shape_problem(shape, dtype)
    if problem is not None:
        return problem
    torch.manual_seed(seed)
    dense = nn.Linear(shape[1], shape[0], bias=False, device="cuda", dtype=dtype)
    prune_24(dense)
    sparse = SemiStructuredLinear(dense)
    x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype)
    kernels = {"dense": lambda: dense(x), "sparse": lambda: sparse(x)}
    # the warm-up round also pays the sparse kernel's first-call setup
    per_round = interleaved_rounds(kernels, _time, calls, rounds, seed)
    dense_ms, sparse_ms = per_round["dense"], per_round["sparse"]
    speedup, low, high = median_ratio(dense_ms / sparse_ms)
    return GemmTiming(
        linears=", ".join(names),
        out_features=shape[0],
        in_features=shape[1],
        tokens=tokens,
        dense_ms=float(np.median(dense_ms)),
        sparse_ms=float(np.median(sparse_ms)),
        speedup=speedup,
        speedup_low=low,
        speedup_high=high,
    )
