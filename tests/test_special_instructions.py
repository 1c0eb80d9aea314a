"""Paper 3.4's special instructions as they exist: low-precision softmax (approx_softmax) and
2:4 semi-structured sparse GEMMs (sparse_gemm_24)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.configuration import TransformSpec
from bench.measure.gemm_timing import linear_shapes
from core.errors import CompoundError
from models.approx_softmax import (
    POLY_EXP_REL_ERROR,
    approx_softmax,
    poly_exp,
    softmax_error_bound,
)
from models.checkpoint import build_bundle, cache_dir, load_trained
from models.dataset import make_examples
from models.generation import model_inputs
from models.presets import get_preset
from models.semi_structured import SemiStructuredLinear, device_problem, mask_24, prune_24
from optimizations.approx_softmax import LOGIT_TOLERANCE
from optimizations.registry import apply_transforms

needs_sparse_cuda = pytest.mark.skipif(
    not torch.cuda.is_available()
    or device_problem(torch.device("cuda"), torch.float16) is not None,
    reason="needs an NVIDIA GPU of compute capability 8.0+",
)


# --- low-precision softmax ----------------------------------------------------------------------
def test_poly_exp_keeps_its_stated_relative_error():
    x = torch.linspace(-80.0, 0.0, 400_001)
    relative = (poly_exp(x).double() / torch.exp(x.double()) - 1).abs().max().item()
    assert relative <= POLY_EXP_REL_ERROR
    assert poly_exp(torch.tensor([float("-inf"), -1000.0])).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exp", ["exact", "poly"])
@pytest.mark.parametrize("length", [8, 300, 2048])
def test_approx_softmax_stays_within_its_bound_and_sums_to_one(dtype, exp, length):
    generator = torch.Generator().manual_seed(length)
    spread = torch.tensor([0.1, 1.0, 5.0, 20.0]).repeat(16)[:, None]  # flat to peaked rows
    scores = torch.randn(64, length, generator=generator) * spread
    exact = torch.softmax(scores.double(), dim=-1)
    approximate = approx_softmax(scores, dtype, exp)
    assert approximate.dtype == dtype
    bound = softmax_error_bound(dtype, length, exp)
    assert (approximate.double() - exact).abs().sum(-1).max().item() <= bound
    assert (approximate.double().sum(-1) - 1).abs().max().item() <= bound


def test_the_bound_is_not_loose_by_orders_of_magnitude():
    # the bound must sit within 20x of the error it bounds, or it says nothing
    scores = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 5
    error = approx_softmax(scores, torch.bfloat16).double() - torch.softmax(scores.double(), -1)
    worst = error.abs().sum(-1).max().item()
    assert softmax_error_bound(torch.bfloat16, 300) < 20 * worst


def test_masked_scores_get_no_weight():
    scores = torch.tensor([[0.5, float("-inf"), 1.0, torch.finfo(torch.float32).min]])
    for exp in ("exact", "poly"):
        weights = approx_softmax(scores, torch.float16, exp)
        assert weights[0, 1].item() == 0.0 and weights[0, 3].item() == 0.0
        assert math.isclose(weights.float().sum().item(), 1.0, abs_tol=1e-3)


@pytest.fixture(scope="module")
def trained_tiny(tiny_cache):
    return load_trained("tiny", cache_dir(tiny_cache), device="cpu", dtype=torch.float32)


def _logits(bundle, requests):
    """Logits at the real tokens of a left-padded batch (padding positions mean nothing)."""
    inputs = model_inputs(bundle, requests)
    with torch.inference_mode():
        return bundle.model(**inputs).logits[inputs["attention_mask"].bool()]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("exp", ["exact", "poly"])
def test_approx_softmax_keeps_its_logit_tolerance_on_a_trained_model(trained_tiny, dtype, exp):
    requests = [trained_tiny.prompts.encode(e) for e in make_examples(0, "test", 6, 0.5)]
    approximate = apply_transforms(
        trained_tiny, (TransformSpec("approx_softmax", {"dtype": dtype, "exp": exp}),)
    )
    difference = (_logits(approximate, requests) - _logits(trained_tiny, requests)).abs().max()
    assert 0 < difference.item() <= LOGIT_TOLERANCE  # changed, and within what it states


def test_approx_softmax_in_float32_would_equal_the_model(trained_tiny):
    # the attention path itself (GQA, mask, padding) is exact: only the softmax's dtype differs
    requests = [trained_tiny.prompts.encode(e) for e in make_examples(1, "test", 4, 0.5)]
    approximate = apply_transforms(trained_tiny, (TransformSpec("approx_softmax"),))
    for index in range(len(approximate.decoder_layers)):
        approximate.attention(index).approx_softmax_settings = (torch.float32, "exact")
    assert torch.allclose(
        _logits(approximate, requests), _logits(trained_tiny, requests), atol=1e-4
    )


# --- 2:4 semi-structured sparsity ---------------------------------------------------------------
def test_mask_keeps_exactly_two_of_every_four_largest_first():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.0, 1.0, 1.0, 1.0, -1.0]])
    assert mask_24(weight).tolist() == [[False, True, True, False, True, True, False, False]]
    random = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    groups = mask_24(random).reshape(64, 32, 4)
    assert torch.equal(groups.sum(-1), torch.full((64, 32), 2))
    kept = random.abs().reshape(64, 32, 4)
    assert torch.all(
        kept[groups].reshape(64, 32, 2).min(-1).values
        >= kept[~groups].reshape(64, 32, 2).max(-1).values
    )


def test_prune_zeroes_half_and_rejects_odd_widths():
    linear = nn.Linear(12, 5)
    prune_24(linear)
    assert int((linear.weight == 0).sum()) == 30
    with pytest.raises(ValueError, match="divisible by 4"):
        mask_24(torch.ones(2, 6))


def test_dense_kernel_prunes_the_chosen_linears_only():
    bundle = build_bundle("tiny", seed=0)
    pruned = apply_transforms(bundle, (TransformSpec("sparse_gemm_24", {"kernel": "dense"}),))
    for index in range(len(pruned.decoder_layers)):
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight = getattr(pruned.mlp(index), name).weight
            assert torch.equal(
                mask_24(weight) | (weight == 0), torch.ones_like(weight, dtype=torch.bool)
            )
            assert torch.equal(weight != 0, mask_24(getattr(bundle.mlp(index), name).weight))
        assert torch.equal(
            pruned.attention(index).q_proj.weight, bundle.attention(index).q_proj.weight
        )
    (entry,) = pruned.metadata["transforms"]
    figures = {f["metric"]: f["value"] for f in entry["figures"]}
    assert figures == {
        "pruned_weight_fraction": pytest.approx(0.5, abs=1e-3),
        "sparse_kernel_linears": 0.0,
        "dense_fallback_linears": 0.0,
    }
    assert entry["targets"] == ["layers.0.mlp", "layers.1.mlp"]


def test_sparse_kernel_is_skipped_with_the_reason_off_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CompoundError, match="skipped: 2:4 sparse GEMMs need an NVIDIA GPU"):
        apply_transforms(build_bundle("tiny", seed=0), (TransformSpec("sparse_gemm_24"),))


def test_shapes_of_a_preset_cover_every_projection():
    shapes = linear_shapes(get_preset("smolvlm-256m"))
    assert shapes[(1536, 576)] == ["gate_proj", "up_proj"]
    assert shapes[(192, 576)] == ["k_proj", "v_proj"]
    assert sum(len(names) for names in shapes.values()) == 7


@needs_sparse_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pruned_dense_matmul_equals_the_semi_structured_one(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(256, 128, bias=True, device="cuda", dtype=dtype)
    prune_24(dense)
    sparse = SemiStructuredLinear(dense)
    x = torch.randn(3, 64, 256, device="cuda", dtype=dtype)
    with torch.inference_mode():
        assert torch.allclose(sparse(x), dense(x), atol=2e-2, rtol=2e-2)
