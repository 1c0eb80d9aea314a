"""Block-sparse attention: prompt layouts, the masks of each pattern, block counts and FLOPs,
FlexAttention against a dense reference with the same mask, and the transform on a model."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.configuration import TransformSpec
from core.errors import CompoundError
from models.checkpoint import build_bundle
from models.dataset import make_examples
from models.generation import generate, model_inputs
from models.sparse_attention import (
    PATTERNS,
    BlockSparsePrefill,
    PromptLayout,
    allowed_mask,
    block_stats,
    build_block_mask,
    flex_problem,
)
from optimizations.registry import apply_transforms

IMAGE = 9  # the image token id in the hand-made layouts


@pytest.fixture(scope="module")
def tiny():
    return build_bundle("tiny", seed=0)


def _layout(rows: list[list[int]], valid: list[list[int]] | None, image_tokens: int):
    ids = torch.tensor(rows)
    mask = None if valid is None else torch.tensor(valid)
    return PromptLayout.from_ids(ids, mask, IMAGE, image_tokens)


def test_layout_numbers_images_and_offsets():
    # two images of 3 tokens back to back, then text; the second row is left-padded
    layout = _layout(
        [[1, 9, 9, 9, 9, 9, 9, 2], [0, 0, 1, 9, 9, 9, 2, 2]],
        [[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]],
        image_tokens=3,
    )
    assert layout.image_id.tolist() == [[-1, 0, 0, 0, 1, 1, 1, -1], [-1, -1, -1, 0, 0, 0, -1, -1]]
    assert layout.image_offset[0].tolist() == [0, 0, 1, 2, 0, 1, 2, 0]
    assert layout.valid[1].tolist() == [False, False, *[True] * 6]


def test_patterns_by_hand():
    layout = _layout([[1, 9, 9, 9, 9, 9, 9, 2]], None, image_tokens=3)
    causal, per_image, local = (allowed_mask(layout, p, 2)[0] for p in PATTERNS)
    assert torch.equal(causal, torch.ones(8, 8, dtype=torch.bool).tril())
    # the second image's first token: text before it yes, first image no, itself yes
    assert per_image[4].tolist() == [True, False, False, False, True, False, False, False]
    # the first image's last token sees itself and one image token before it (window 2)
    assert local[3].tolist() == [True, False, True, True, False, False, False, False]
    assert per_image[7].all() and local[7].all()  # the text after the images sees everything
    assert not (local & ~per_image).any() and not (per_image & ~causal).any()


def test_padding_is_never_attended():
    layout = _layout([[0, 0, 1, 9, 9, 2]], [[0, 0, 1, 1, 1, 1]], image_tokens=2)
    for pattern in PATTERNS:
        mask = allowed_mask(layout, pattern, 4)[0]
        assert not mask[:, :2].any() and not mask[:2].any()


def test_block_counts_and_flops_of_a_known_pattern():
    # 16 text, one image of 32 tokens, 16 text: 4 × 4 blocks of 16, 10 of them causal
    layout = _layout([[1] * 16 + [9] * 32 + [2] * 16], None, image_tokens=32)
    per_image = block_stats(allowed_mask(layout, "per_image", 1), layout, 16)
    assert (per_image.blocks, per_image.causal_blocks, per_image.active_blocks) == (16, 10, 10)
    # window 1: an image token sees only itself in its image, so the image's second block
    # skips its first; every other causal block keeps at least one allowed pair
    local = block_stats(allowed_mask(layout, "local", 1), layout, 16)
    assert local.active_blocks == 9
    assert local.sparsity == pytest.approx(7 / 16)
    assert local.work_fraction == pytest.approx(9 / 10)
    heads, head_dim = 4, 8
    flops = local.attention_flops(heads, head_dim)
    assert flops["block_sparse"] == 9 * 16 * 16 * 4 * heads * head_dim
    q = torch.randn(1, heads, 64, head_dim)
    with FlopCounterMode(display=False) as counter:  # dense attention as two matmuls
        (q @ q.transpose(-1, -2)).softmax(dim=-1) @ q
    assert flops["dense_square"] == counter.get_total_flops()


def test_zero_extra_sparsity_skips_only_the_upper_triangle():
    layout = _layout([[1] * 64], None, image_tokens=16)  # no image: every pattern is causal
    stats = [block_stats(allowed_mask(layout, p, 4), layout, 16) for p in PATTERNS]
    assert {(s.active_blocks, s.work_fraction) for s in stats} == {(10, 1.0)}


def _flex_versus_dense(layout, pattern, window, block_size, heads=4, kv_heads=2, head_dim=16):
    torch.manual_seed(0)
    rows, length = layout.valid.shape
    q = torch.randn(rows, heads, length, head_dim)
    k = torch.randn(rows, kv_heads, length, head_dim)
    v = torch.randn(rows, kv_heads, length, head_dim)
    mask = allowed_mask(layout, pattern, window)
    state = BlockSparsePrefill(IMAGE, 0, pattern, window, block_size)
    state.current = build_block_mask(mask, block_size, q.device)
    state.length = length
    with torch.inference_mode():
        sparse = state.attend(q, k, v, None)
        repeat = heads // kv_heads
        dense = F.scaled_dot_product_attention(
            q,
            k.repeat_interleave(repeat, 1),
            v.repeat_interleave(repeat, 1),
            attn_mask=mask[:, None],
        ).transpose(1, 2)
    real = layout.valid  # padded query rows attend nothing: their output is not compared
    return (sparse - dense)[real].abs().max().item()


@pytest.mark.skipif(flex_problem(torch.device("cpu")) is not None, reason="no FlexAttention here")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_flex_equals_dense_attention_with_the_same_mask(pattern):
    # 40 tokens (not a whole number of blocks), two images, a left-padded second row, GQA
    row = [1, 2] + [9] * 16 + [3] + [9] * 16 + [4] * 5
    padded = [0] * 6 + row[:-6]
    layout = _layout([row, padded], [[1] * 40, [0] * 6 + [1] * 34], image_tokens=16)
    assert _flex_versus_dense(layout, pattern, window=5, block_size=16) < 1e-5


# --- the transform on a model -------------------------------------------------------------------
def _requests(bundle, count, image_fraction=0.5):
    return [bundle.prompts.encode(e) for e in make_examples(0, "test", count, image_fraction)]


def _prefill_logits(bundle, requests):
    with torch.inference_mode():
        return bundle.model(**model_inputs(bundle, requests)).logits


needs_flex = pytest.mark.skipif(
    flex_problem(torch.device("cpu")) is not None, reason="no FlexAttention here"
)


@needs_flex
def test_causal_pattern_keeps_the_model_exact(tiny):
    requests = _requests(tiny, 4)
    sparse = apply_transforms(
        tiny, (TransformSpec("block_sparse_attention", {"pattern": "causal"}),)
    )
    for request in requests:
        assert torch.allclose(
            _prefill_logits(sparse, [request]), _prefill_logits(tiny, [request]), atol=1e-5
        )
        assert torch.equal(generate(sparse, request, 4), generate(tiny, request, 4))
    assert sparse.metadata["block_sparse"]["prefills"] >= len(requests)


@needs_flex
def test_local_pattern_changes_image_prompts_only(tiny):
    text, image = _requests(tiny, 2)
    sparse = apply_transforms(
        tiny, (TransformSpec("block_sparse_attention", {"pattern": "local", "window": 2}),)
    )
    assert torch.allclose(_prefill_logits(sparse, [text]), _prefill_logits(tiny, [text]), atol=1e-5)
    assert not torch.allclose(
        _prefill_logits(sparse, [image]), _prefill_logits(tiny, [image]), atol=1e-3
    )
    last = sparse.metadata["block_sparse"]["last"]
    assert 0 < last["allowed_pair_fraction"] < 1


@needs_flex
def test_a_padded_batch_equals_its_requests_one_by_one(tiny):
    requests = _requests(tiny, 4)  # text prompts are shorter: the batch is left-padded
    sparse = apply_transforms(
        tiny, (TransformSpec("block_sparse_attention", {"pattern": "local", "window": 3}),)
    )
    batch = _prefill_logits(sparse, requests)[:, -1]
    alone = torch.cat([_prefill_logits(sparse, [r])[:, -1] for r in requests])
    assert torch.allclose(batch, alone, atol=1e-4)
    batched_tokens = generate(sparse, requests, 3)[:, -3:]
    alone_tokens = torch.cat([generate(sparse, r, 3)[:, -3:] for r in requests])
    assert torch.equal(batched_tokens, alone_tokens)


@needs_flex
def test_static_cache_prefill_uses_the_prompt_keys_only(tiny):
    (request,) = _requests(tiny, 1, image_fraction=1.0)
    sparse = apply_transforms(
        tiny, (TransformSpec("block_sparse_attention", {"pattern": "local"}),)
    )
    eager = generate(sparse, request, 4)
    static = generate(sparse, request, 4, engine="static", cache_length=64)
    assert torch.equal(eager, static)


def test_missing_compiler_skips_with_the_reason(tiny, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(CompoundError, match="skipped: needs a C\\+\\+ compiler"):
        apply_transforms(tiny, (TransformSpec("block_sparse_attention"),))


def test_conflicts_with_token_pruning(tiny):
    specs = (TransformSpec("block_sparse_attention"), TransformSpec("token_pruning"))
    with pytest.raises(CompoundError, match="conflict"):
        apply_transforms(tiny, specs)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"pattern": "stripes"}, "must be one of"),
        ({"block_size": 24}, "must be one of"),
        ({"window": 0}, "must be in"),
    ],
)
def test_bad_parameters_are_one_line(params, message):
    with pytest.raises(CompoundError, match=message):
        apply_transforms(
            build_bundle("tiny", seed=0), (TransformSpec("block_sparse_attention", params),)
        )
