"""Attention with its softmax in reduced precision (paper 3.4's SOFTMAX_APPROX, as it exists).

No public ISA has an instruction named SOFTMAX_APPROX. What a PyTorch user can run is a softmax
whose inputs, exponentials and outputs are bfloat16 or float16 while the rest of the layer keeps
its dtype, optionally with a cheaper exponential: `poly_exp` computes e^x as 2^n · p(f), a cubic
p fitted to 2^f on [0, 1) (relative error below `POLY_EXP_REL_ERROR`), the trick behind
table- and polynomial-based exp units. The sum over a row is accumulated by torch's kernel (in
float32 internally, on CPU and CUDA alike) and rounded to the reduced dtype.

Error bound (first order in the unit roundoff u of the dtype, 2^-8 for bfloat16, 2^-11 for
float16, and ε, the exponential's relative error: u when exact and rounded, POLY_EXP_REL_ERROR
+ u for the polynomial): with z_i = x_i - max x and p_i the exact softmax, rounding z costs a
relative u·|z_i| in e^z_i, the exponential ε, the row sum those errors on average plus u, the
division u. Since Σ p_i·|z_i| is at most the row's entropy (≤ ln n), a row's L1 error
Σ|p̂_i - p_i| is at most 2u·(1 + ln n) + 2ε, plus n·tiny·u for values below the dtype's
smallest normal (`softmax_error_bound`).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch

ATTENTION_NAME = "compound_approx_softmax"  # our entry in transformers' AttentionInterface
EXP_KINDS = ("exact", "poly")
SOFTMAX_DTYPES = ("bfloat16", "float16")

# p(f) ≈ 2^f on [0, 1): least squares on relative error over 2,000 Chebyshev nodes; its worst
# relative error on a grid of 100,001 points is 7.7e-5 in float64.
_POLY_COEFFICIENTS = (
    0.9999278266445141,
    0.6957770964274221,
    0.22623319419985638,
    0.07790716377386674,
)
POLY_EXP_REL_ERROR = 1e-4  # stated bound: 7.7e-5 measured, plus float32 rounding
_LOG2_E = 1.0 / math.log(2.0)
_MIN_EXPONENT = -150.0  # 2^-150 is below float32's smallest subnormal: the result is 0


def poly_exp(x: torch.Tensor) -> torch.Tensor:
    """e^x for x ≤ 0 (a softmax's shifted scores) as 2^n · p(f), in float32; -inf gives 0."""
    t = (x.float() * _LOG2_E).clamp(min=_MIN_EXPONENT)
    n = torch.floor(t)
    f = t - n
    c0, c1, c2, c3 = _POLY_COEFFICIENTS
    p = c0 + f * (c1 + f * (c2 + f * c3))
    return torch.ldexp(p, n.to(torch.int32))


def approx_softmax(scores: torch.Tensor, dtype: torch.dtype, exp: str = "exact") -> torch.Tensor:
    """Softmax over the last dimension with shifted scores, exponentials, sum and result in
    `dtype`; `exp` "poly" replaces the exponential by `poly_exp`."""
    if exp not in EXP_KINDS:
        raise ValueError(f"exp must be one of {EXP_KINDS}, not {exp!r}")
    shifted = (scores - scores.amax(dim=-1, keepdim=True)).to(dtype)
    exponentials = torch.exp(shifted) if exp == "exact" else poly_exp(shifted).to(dtype)
    total = exponentials.sum(dim=-1, keepdim=True)
    return exponentials / total


def softmax_error_bound(dtype: torch.dtype, length: int, exp: str = "exact") -> float:
    """First-order bound on one row's L1 error, Σ|p̂_i - p_i|, over `length` entries."""
    info = torch.finfo(dtype)
    u = info.eps / 2
    epsilon = POLY_EXP_REL_ERROR + u if exp == "poly" else u
    return 2 * u * (1 + math.log(max(1, length))) + 2 * epsilon + 2 * length * info.tiny * u


def approx_softmax_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: scores and the weighted sum in the model's
    dtype, the softmax in the layer's `approx_softmax_settings` (dtype, exp)."""
    dtype, exp = module.approx_softmax_settings
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        )
    weights = approx_softmax(scores, dtype, exp).to(value.dtype)
    output = torch.matmul(weights, value)
    return output.transpose(1, 2).contiguous(), None


@cache
def register_attention() -> str:
    """Make our attention function (with the eager attention's additive mask) known to
    transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION_NAME, approx_softmax_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)
    return ATTENTION_NAME
