"""The memory plan: its arithmetic from model shapes, and the one-line stop when it overflows."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from bench.measure.memory_plan import (
    BYTES_PER_GIB,
    BYTES_PER_MIB,
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    WorkerEstimate,
    check_fits,
    estimate_worker,
    format_bytes,
    free_bytes,
    workers_that_fit,
)
from core.errors import CompoundError
from models.bundle import count_parameters
from models.checkpoint import build_bundle

# A hand-made LLaVA shape whose numbers the expected figures below are computed from.
TEXT = dict(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=12,  # deliberately not hidden_size // heads (= 8)
    vocab_size=300,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def _model(tie: bool = False) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(**TEXT, tie_word_embeddings=tie),
        image_token_index=TEXT["vocab_size"] - 1,
        projector_hidden_act="gelu",
        tie_word_embeddings=tie,
    )
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def _expected_parameters() -> int:
    """Parameters of the hand-made shape, from the config numbers alone."""
    h, i, hd = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["head_dim"]
    heads, kv, vocab = TEXT["num_attention_heads"], TEXT["num_key_value_heads"], TEXT["vocab_size"]
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h  # q, k, v, o: no bias
    decoder_layer = attention + 3 * h * i + 2 * h  # gate/up/down + two RMSNorms
    text = vocab * h + TEXT["num_hidden_layers"] * decoder_layer + h + vocab * h  # + lm_head

    vh, vi = VISION["hidden_size"], VISION["intermediate_size"]
    patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    embeddings = 3 * VISION["patch_size"] ** 2 * vh + vh + (patches + 1) * vh  # conv, CLS, pos
    vision_layer = 4 * (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh) + 2 * 2 * vh
    vision = embeddings + 2 * vh + VISION["num_hidden_layers"] * vision_layer + 2 * vh

    projector = (vh * h + h) + (h * h + h)
    return text + vision + projector


def _kv_bytes(batch: int, sequence: int, element: int) -> int:
    return (
        2
        * TEXT["num_hidden_layers"]
        * TEXT["num_key_value_heads"]
        * TEXT["head_dim"]
        * batch
        * sequence
        * element
    )


def _estimate(
    total_gib: float = 10.0, *, dtype: str = "bfloat16", batch: int = 1, device: str = "cuda"
) -> WorkerEstimate:
    """A made-up estimate whose total is exactly `total_gib`."""
    total = int(total_gib * BYTES_PER_GIB)
    return WorkerEstimate(
        weights_bytes=total - 3 * BYTES_PER_MIB - CUDA_CONTEXT_BYTES,
        kv_cache_bytes=2 * BYTES_PER_MIB,
        activation_bytes=BYTES_PER_MIB,
        overhead_bytes=CUDA_CONTEXT_BYTES,
        dtype=dtype,
        batch_size=batch,
        sequence_length=600,
        device_type=device,
        parameters=0,
    )


def test_weights_and_kv_follow_the_config_numbers():
    model = _model()
    assert count_parameters(model) == _expected_parameters()
    estimate = estimate_worker(model, torch.float32, 4, 100, "cpu")
    assert estimate.weights_bytes == _expected_parameters() * 4
    assert estimate.kv_cache_bytes == _kv_bytes(4, 100, 4)
    assert estimate.overhead_bytes == CPU_RUNTIME_BYTES
    assert estimate.total == (
        estimate.weights_bytes
        + estimate.kv_cache_bytes
        + estimate.activation_bytes
        + estimate.overhead_bytes
    )


def test_activations_are_the_stated_bound():
    estimate = estimate_worker(_model(), torch.float32, 2, 100, "cpu")
    h, i = TEXT["hidden_size"], TEXT["intermediate_size"]
    decoder = 2 * 100 * (4 * h + 3 * i + TEXT["num_attention_heads"] * 100) * 4
    tokens = (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1
    vh, vi = VISION["hidden_size"], VISION["intermediate_size"]
    vision = 2 * tokens * (4 * vh + 3 * vi + VISION["num_attention_heads"] * tokens) * 4
    logits = 2 * TEXT["vocab_size"] * 4
    assert estimate.activation_bytes == max(decoder, vision) + logits


def test_tied_embeddings_count_once():
    untied = estimate_worker(_model(tie=False), torch.float32, 1, 10, "cpu")
    tied = estimate_worker(_model(tie=True), torch.float32, 1, 10, "cpu")
    assert untied.weights_bytes - tied.weights_bytes == TEXT["vocab_size"] * TEXT["hidden_size"] * 4


def test_cuda_overhead_is_the_declared_context():
    estimate = estimate_worker(_model(), torch.bfloat16, 1, 10, "cuda")
    assert estimate.overhead_bytes == CUDA_CONTEXT_BYTES
    assert "CUDA context" in estimate.summary()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_halves_weights_and_cache(half):
    model = _model()
    full = estimate_worker(model, torch.float32, 2, 50, "cpu")
    reduced = estimate_worker(model, half, 2, 50, "cpu")
    assert reduced.weights_bytes * 2 == full.weights_bytes
    assert reduced.kv_cache_bytes * 2 == full.kv_cache_bytes
    assert reduced.dtype == str(half).removeprefix("torch.")


@pytest.mark.parametrize(("batch", "sequence"), [(1, 1), (3, 1), (1, 7), (5, 64)])
def test_kv_cache_scales_linearly_with_batch_and_sequence(batch, sequence):
    model = _model()
    unit = estimate_worker(model, torch.bfloat16, 1, 1, "cpu").kv_cache_bytes
    assert unit == _kv_bytes(1, 1, 2)
    scaled = estimate_worker(model, torch.bfloat16, batch, sequence, "cpu").kv_cache_bytes
    assert scaled == unit * batch * sequence


def test_describe_labels_every_figure_as_an_estimate_with_its_derivation():
    estimate = estimate_worker(_model(), torch.bfloat16, 2, 30, "cuda")
    data = estimate.describe()
    json.dumps(data)
    assert data["estimated"] is True
    for key, value in [
        ("weights", estimate.weights_bytes),
        ("kv_cache", estimate.kv_cache_bytes),
        ("activations", estimate.activation_bytes),
        ("overhead", estimate.overhead_bytes),
        ("total", estimate.total),
    ]:
        assert data[key]["estimated_bytes"] == value
        assert data[key]["how"]
    assert "parameters ×" in data["weights"]["how"]
    assert "declared" in data["overhead"]["how"]


def test_llava_7b_in_bfloat16_weighs_two_bytes_a_parameter():
    model = build_bundle("llava-1.5-7b", materialize=False).model
    parameters = count_parameters(model)
    assert parameters == pytest.approx(7.06e9, rel=0.03)
    estimate = estimate_worker(model, torch.bfloat16, 1, 600, "cuda")
    assert estimate.weights_bytes == parameters * 2
    # Llama-2-7B: 32 layers × 32 KV heads × 128 head dim, K and V, 2 bytes each.
    assert estimate.kv_cache_bytes == 2 * 32 * 32 * 128 * 600 * 2
    assert "13.2 GiB weights in bfloat16" in estimate.summary()


def test_check_fits_passes_when_the_workers_fit():
    check_fits(_estimate(10), 6, 100 * BYTES_PER_GIB, device="cuda")  # 60 ≤ 90
    check_fits(_estimate(10), 9, 100 * BYTES_PER_GIB, device="cuda")  # 90 ≤ 90


def test_check_fits_stops_with_one_line_naming_workers_and_free_memory():
    with pytest.raises(CompoundError) as caught:
        check_fits(_estimate(14.8), 8, int(71.2 * BYTES_PER_GIB), device="cuda")
    message = str(caught.value)
    assert "\n" not in message
    assert "about 118.4 GiB on cuda" in message
    assert "8 workers alive at once × 14.8 GiB each" in message
    assert "71.2 GiB is free" in message
    assert "weights in bfloat16" in message


def test_advice_offers_everything_that_would_help():
    with pytest.raises(CompoundError) as caught:
        check_fits(_estimate(10, dtype="float32", batch=4), 8, 50 * BYTES_PER_GIB, device="cuda")
    message = str(caught.value)
    assert "fewer configurations (at most 4 fit" in message
    assert "--design singles" in message
    assert "smaller --batch-size (now 4)" in message
    assert "--dtype bfloat16" in message


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_advice_skips_what_is_already_done(dtype):
    with pytest.raises(CompoundError) as caught:
        check_fits(_estimate(10, dtype=dtype, batch=1), 8, 50 * BYTES_PER_GIB, device="cuda")
    message = str(caught.value)
    assert "fewer configurations" in message
    assert "--batch-size" not in message
    assert "--dtype" not in message


def test_advice_when_not_even_one_worker_fits():
    with pytest.raises(CompoundError) as caught:
        check_fits(_estimate(10, batch=1), 3, 5 * BYTES_PER_GIB, device="cuda")
    message = str(caught.value)
    assert "not even one worker fits" in message
    assert "fewer configurations" not in message
    assert "smaller model" in message
    assert "3 workers alive at once" in message


@pytest.mark.parametrize("headroom", [0.9, 1.0, 0.5])
def test_workers_that_fit_agrees_with_check_fits(headroom):
    estimate = _estimate(3)
    frees = [0, estimate.total - 1, estimate.total, 7 * estimate.total, 7 * estimate.total + 1]
    frees += [int(n * BYTES_PER_GIB) for n in (1.5, 10, 33.3, 100)]
    for free in frees:
        fit = workers_that_fit(estimate, free, headroom)
        assert estimate.total * fit <= headroom * free < estimate.total * (fit + 1)
        for workers in range(1, fit + 3):
            if workers <= fit:
                check_fits(estimate, workers, free, device="cpu", headroom=headroom)
            else:
                with pytest.raises(CompoundError):
                    check_fits(estimate, workers, free, device="cpu", headroom=headroom)


def test_free_bytes_on_cpu_is_positive():
    assert free_bytes(torch.device("cpu")) > 0
    with pytest.raises(ValueError):
        free_bytes(torch.device("meta"))


def test_bad_arguments_are_programming_errors():
    with pytest.raises(ValueError):
        check_fits(_estimate(), 0, BYTES_PER_GIB, device="cpu")
    with pytest.raises(ValueError):
        workers_that_fit(_estimate(), BYTES_PER_GIB, headroom=0)
    with pytest.raises(ValueError):
        estimate_worker(_model(), torch.float32, 0, 10, "cpu")


def test_format_bytes_uses_mib_below_one_gib():
    assert format_bytes(512 * BYTES_PER_MIB) == "512.0 MiB"
    assert format_bytes(1.5 * BYTES_PER_GIB) == "1.5 GiB"
    assert format_bytes(BYTES_PER_GIB) == "1.0 GiB"
