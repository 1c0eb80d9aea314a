"""Attention/FFN overlap: the split batch on two lanes gives the unsplit batch's outputs, in the
two-micro-batch order; the transform asks for CUDA and the static engine."""

from __future__ import annotations

import pytest
import torch

from bench.configuration import TransformSpec
from core.errors import CompoundError
from models.checkpoint import build_bundle, cache_dir, load_trained
from models.dataset import make_examples
from models.generation import generate, model_inputs
from models.overlap import OverlapState, SequentialLanes, install
from optimizations.registry import apply_transforms, get_transform


@pytest.fixture(scope="module")
def trained_tiny(tiny_cache):
    return load_trained("tiny", cache_dir(tiny_cache), device="cpu", dtype=torch.float32)


def _overlapped(bundle):
    copy = bundle.clone()
    lanes = SequentialLanes()
    install(copy.language_model, copy.decoder_layers, OverlapState(lanes))
    return copy, lanes


def _requests(bundle, count):
    return [bundle.prompts.encode(e) for e in make_examples(0, "test", count, 0.5)]


@pytest.mark.parametrize("batch", [2, 5])
def test_split_batch_generates_what_the_whole_batch_does(trained_tiny, batch):
    requests = _requests(trained_tiny, batch)  # mixed image and text: a left-padded batch
    overlapped, lanes = _overlapped(trained_tiny)
    expected = generate(trained_tiny, requests, 5, engine="static", cache_length=128)
    actual = generate(overlapped, requests, 5, engine="static", cache_length=128)
    assert torch.equal(actual, expected)
    assert sum(1 for kind, _, _ in lanes.log if kind == "work") == 4 * 2 * 5  # 4 per layer per step


def test_split_prefill_logits_match(trained_tiny):
    requests = _requests(trained_tiny, 4)
    overlapped, _ = _overlapped(trained_tiny)
    with torch.inference_mode():
        inputs = model_inputs(trained_tiny, requests)
        expected = trained_tiny.model(**inputs, use_cache=False).logits
        actual = overlapped.model(**inputs, use_cache=False).logits
    assert (actual - expected).abs().max().item() <= get_transform("attn_ffn_overlap").tolerance


def test_schedule_is_attention_a_b_then_ffn_a_b_with_their_waits(trained_tiny):
    overlapped, lanes = _overlapped(trained_tiny)
    with torch.inference_mode():
        overlapped.model(**model_inputs(trained_tiny, _requests(trained_tiny, 2)), use_cache=False)
    work = [label for kind, _, label in lanes.log if kind == "work"]
    assert work == ["attention A", "attention B", "ffn A", "ffn B"] * 2
    marks = {token: lane for kind, lane, token in lanes.log if kind == "mark"}
    waits = [(lane, marks[token]) for kind, lane, token in lanes.log if kind == "wait"]
    # layer 0 waits for the input (main); each FFN for its attention; layer 1's attention for
    # the previous layer's FFN of its own half, not the main lane
    assert waits[:4] == [
        ("attention", "main"),
        ("attention", "main"),
        ("ffn", "attention"),
        ("ffn", "attention"),
    ]
    assert waits[6:8] == [("attention", "ffn"), ("attention", "ffn")]


def test_batch_of_one_is_served_unsplit(trained_tiny):
    overlapped, lanes = _overlapped(trained_tiny)
    (request,) = _requests(trained_tiny, 1)
    assert torch.equal(generate(overlapped, request, 3), generate(trained_tiny, request, 3))
    assert lanes.log == []


def test_a_dynamic_cache_is_refused_not_corrupted(trained_tiny):
    overlapped, _ = _overlapped(trained_tiny)
    with pytest.raises(CompoundError, match="static KV cache"):
        generate(overlapped, _requests(trained_tiny, 2), 3)


def test_transform_needs_cuda_and_the_static_engine():
    transform = get_transform("attn_ffn_overlap")
    assert "static" in transform.engines and transform.engine_problem("eager") is not None
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CompoundError, match="skipped: needs a CUDA device"):
        apply_transforms(build_bundle("tiny", seed=0), (TransformSpec("attn_ffn_overlap"),))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_streams_the_outputs_match_and_overlap_is_reported(tiny_cache):
    bundle = load_trained("tiny", cache_dir(tiny_cache), device="cuda", dtype=torch.float32)
    requests = _requests(bundle, 8)
    overlapped = apply_transforms(bundle, (TransformSpec("attn_ffn_overlap"),))
    seen = {}
    overlapped.events.listener = type(
        "Listener",
        (),
        {"value": lambda self, name, value, unit, module: seen.setdefault(name, value)},
    )()
    expected = generate(bundle, requests, 4, engine="static", cache_length=128)
    assert torch.equal(
        generate(overlapped, requests, 4, engine="static", cache_length=128), expected
    )
    assert 0.5 < seen["overlap_busy_over_wall"] <= 2.05
