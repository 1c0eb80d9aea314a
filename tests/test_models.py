"""Presets, the bundle's handles, generation, checkpoints and the cost-only shapes."""

from __future__ import annotations

import json
from collections import Counter

import psutil
import pytest
import torch

from bench.measure.trackers.modules import check_not_nested
from core.errors import CompoundError
from models.checkpoint import (
    build_bundle,
    checkpoint_path,
    load_model_dir,
    load_trained,
    save_checkpoint,
)
from models.dataset import make_examples
from models.evaluate import evaluate, greedy_answers
from models.generation import generate, model_inputs
from models.presets import get_preset

NEW_TOKENS = 3


def _alone(bundle, request) -> str:
    """The answer to one request generated on its own: its tokens past the prompt, decoded."""
    output = generate(bundle, request, NEW_TOKENS)
    tokens = output[0, len(request.input_ids) :].tolist()
    return bundle.prompts.tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_forward_and_greedy_generation(preset):
    bundle = build_bundle(preset)
    requests = [bundle.prompts.encode(e) for e in make_examples(0, "test", 12)]
    with torch.no_grad():
        for request in requests:
            logits = bundle.model(**model_inputs(bundle, [request])).logits
            assert logits.shape == (
                1,
                len(request.input_ids),
                bundle.model.config.text_config.vocab_size,
            )
    # Batching must happen (prompts of equal length, with and without images) for the
    # comparison below to test it.
    lengths = Counter((len(r.input_ids), r.pixel_values is not None) for r in requests)
    assert any(n >= 2 and image for (_, image), n in lengths.items())
    assert any(n >= 2 and not image for (_, image), n in lengths.items())

    batched = greedy_answers(bundle, requests, max_new_tokens=NEW_TOKENS)
    one_by_one = greedy_answers(bundle, requests, max_new_tokens=NEW_TOKENS, batch_size=1)
    assert batched == one_by_one
    # Each request alone through `generate`, which suppresses end-of-sequence until the last
    # token: greedy answering stops at end-of-sequence instead, so its answer is that text or
    # the part of it before the step where end-of-sequence won.
    alone = [_alone(bundle, r) for r in requests]
    for answer, full in zip(batched, alone, strict=True):
        assert full.startswith(answer), (answer, full)
        if len(answer.split()) == NEW_TOKENS:
            assert answer == full
    # Answers differ across requests, so a mix-up of rows within a batch would show.
    assert len(set(batched)) > 1


@pytest.mark.parametrize("preset,image_tokens", [("tiny", 16), ("small", 64)])
def test_preset_sizes_and_visual_tokens(preset, image_tokens):
    # (image_size / patch_size)²: tiny 32 px / 8 px patches = 4×4, small 64 / 8 = 8×8.
    vision = get_preset(preset).vision
    assert (vision["image_size"] // vision["patch_size"]) ** 2 == image_tokens
    assert get_preset(preset).image_tokens == image_tokens
    bundle = build_bundle(preset)
    assert bundle.prompts.image_tokens == image_tokens
    example = next(e for e in make_examples(0, "test", 4) if e.has_image)
    request = bundle.prompts.encode(example)
    assert request.input_ids.count(bundle.prompts.image_token_id) == image_tokens


def test_preset_parameter_counts():
    tiny, small = build_bundle("tiny"), build_bundle("small")
    assert tiny.param_count() <= 3_000_000
    assert small.param_count() > tiny.param_count()


def test_handles_name_every_module_once_and_do_not_nest():
    bundle = build_bundle("tiny")
    handles = bundle.handles()
    layers = len(bundle.decoder_layers)
    assert {"vision_encoder", "projector", "lm_head"} <= set(handles)
    assert sum(name.endswith(".attention") for name in handles) == layers
    assert sum(name.endswith(".mlp") for name in handles) == layers
    check_not_nested(handles)


@pytest.mark.parametrize(
    "preset,low,high", [("smolvlm-256m", 150e6, 300e6), ("llava-1.5-7b", 6.5e9, 7.5e9)]
)
def test_cost_only_presets_build_without_allocating(preset, low, high):
    rss_before = psutil.Process().memory_info().rss
    bundle = build_bundle(preset)
    assert all(p.device.type == "meta" for p in bundle.model.parameters())
    assert low < bundle.param_count() < high
    assert not bundle.trained and bundle.describe()["cost_only"]
    # A 7B model in fp32 would take 28 GB; building its shape must not come near that.
    assert psutil.Process().memory_info().rss - rss_before < 500 * 2**20


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    bundle = build_bundle("tiny", seed=1)
    save_checkpoint(bundle, tmp_path / "ckpt", {"note": "test"})
    loaded = load_model_dir(tmp_path / "ckpt")
    request = bundle.prompts.encode(next(e for e in make_examples(0, "test", 4) if e.has_image))
    with torch.no_grad():
        before = bundle.model(**model_inputs(bundle, [request])).logits
        after = loaded.model(**model_inputs(loaded, [request])).logits
    assert torch.equal(before, after)
    assert loaded.preset == "tiny" and loaded.metadata["note"] == "test"


def test_training_tiny_lifts_accuracy_well_above_chance(tiny_cache):
    trained = load_trained("tiny", tiny_cache)
    untrained = build_bundle("tiny")
    before = evaluate(untrained, split="val", count=200)
    after = evaluate(trained, split="val", count=200)
    # Chance: about 1 in 4 for image answers, 1 in 21 for numbers. Untrained scores near zero.
    assert after.accuracy["text"] >= 0.6, after.accuracy
    assert after.accuracy["image"] >= 0.4, after.accuracy
    assert after.accuracy["text"] > before.accuracy["text"] + 0.3
    assert trained.trained and not untrained.trained


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_load_errors_are_one_clear_line(tmp_path):
    with pytest.raises(CompoundError, match="not a directory"):
        load_model_dir(tmp_path / "missing")
    with pytest.raises(CompoundError, match="model config is missing"):
        load_model_dir(tmp_path)
    _write(tmp_path / "bad" / "config.json", "{not json")
    with pytest.raises(CompoundError, match="not valid JSON"):
        load_model_dir(tmp_path / "bad")
    _write(tmp_path / "bert" / "config.json", json.dumps({"model_type": "bert"}))
    with pytest.raises(CompoundError, match="unsupported architecture 'bert'"):
        load_model_dir(tmp_path / "bert")
    with pytest.raises(CompoundError, match="unknown preset"):
        get_preset("nope")


def test_corrupt_weights_are_a_clear_error(tmp_path):
    save_checkpoint(build_bundle("tiny"), tmp_path / "ckpt", {})
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CompoundError, match="cannot load weights"):
        load_model_dir(tmp_path / "ckpt")


def test_missing_trained_checkpoint_says_how_to_make_it(tmp_path):
    with pytest.raises(CompoundError, match="compound train --preset small"):
        load_trained("small", tmp_path)
    with pytest.raises(CompoundError, match="cost-only"):
        load_trained("llava-1.5-7b", tmp_path)
    assert checkpoint_path(get_preset("tiny"), tmp_path).parent == tmp_path / "checkpoints"
