"""The transform layer: registry, validation, copy-on-apply, lossless checks, and the three
techniques (vision sleep, visual-token pruning, fused projections) on the untrained tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.configuration import TransformSpec
from bench.measure.trackers.events import EventTracker
from core.errors import CompoundError
from models.bundle import ModelBundle
from models.checkpoint import build_bundle, load_model_dir, save_checkpoint
from models.dataset import make_examples
from models.generation import generate, model_inputs
from models.prompting import Request
from optimizations.lossless import check_lossless
from optimizations.registry import (
    apply_transforms,
    get_transform,
    list_transforms,
)
from optimizations.requirements import unmet_requirement
from optimizations.token_pruning import last_token_attention
from tests.fakes import install_fakes

NEW_TOKENS = 4
TINY_IMAGE_TOKENS = 16  # (32 / 8)² patches


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model gains nothing from threads, and two threads on cores shared with another
    job made each generate() ~60x slower (measured 0.4 s vs 7 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> ModelBundle:
    return build_bundle("tiny", seed=0)


def requests(bundle: ModelBundle, count: int, image_fraction: float) -> list[Request]:
    return [bundle.prompts.encode(e) for e in make_examples(0, "test", count, image_fraction)]


@pytest.fixture(scope="module")
def mixed(tiny) -> list[Request]:
    return requests(tiny, 6, 0.5)


def image_request(bundle: ModelBundle) -> Request:
    return next(r for r in requests(bundle, 4, 0.5) if r.pixel_values is not None)


def text_request(bundle: ModelBundle) -> Request:
    return next(r for r in requests(bundle, 4, 0.5) if r.pixel_values is None)


@torch.inference_mode()
def prefill_logits(bundle: ModelBundle, request: Request) -> torch.Tensor:
    return bundle.model(**model_inputs(bundle, [request])).logits


def apply_one(bundle: ModelBundle, name: str, params: dict | None = None) -> ModelBundle:
    """A transformed clone of `bundle` with one transform applied."""
    return apply_transforms(bundle, (TransformSpec(name, params or {}),))


@pytest.fixture()
def test_transforms(monkeypatch):
    install_fakes(monkeypatch)


# --- registry ---------------------------------------------------------------------------------
def test_list_transforms_describes_every_transform():
    listed = {entry["name"]: entry for entry in list_transforms()}
    assert {"fused_qkv", "token_pruning", "vision_sleep"} <= set(listed)
    json.dumps(listed)  # ready for `compound transforms --json`
    pruning = listed["token_pruning"]
    assert pruning["lossless"] is False and pruning["tolerance"] is None
    params = {p["name"]: p for p in pruning["params"]}
    assert params["layer"]["default"] is None and params["layer"]["type"] == "int | None"
    assert params["keep_ratio"]["range"] == "(0, 1]"
    assert params["threshold"]["type"] == "float | None" and params["threshold"]["default"] is None
    assert listed["fused_qkv"]["lossless"] is True and listed["fused_qkv"]["tolerance"] > 0
    assert listed["vision_sleep"]["targets"] == ["vision_encoder", "projector"]


def test_unknown_transform_lists_known_names():
    with pytest.raises(CompoundError, match=r"unknown transform 'nope' \(known: .*fused_qkv"):
        get_transform("nope")


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("token_pruning", {"ratio": 0.5}, r"unknown parameter 'ratio' \(known: layer, keep_r"),
        ("token_pruning", {"keep_ratio": "0.5"}, r"'keep_ratio' must be float, got str"),
        ("token_pruning", {"layer": True}, r"'layer' must be int \| None, got bool"),
        ("token_pruning", {"layer": 1.0}, r"'layer' must be int \| None, got float"),
        ("token_pruning", {"keep_ratio": 0.0}, r"'keep_ratio' must be in \(0, 1\], got 0.0"),
        ("token_pruning", {"keep_ratio": 1.5}, r"must be in \(0, 1\], got 1.5"),
        ("token_pruning", {"threshold": -0.1}, r"'threshold' must be in \[0, 1\]"),
        ("token_pruning", {"layer": -1}, r"'layer' must be in \[0, inf\)"),
        ("vision_sleep", {"mode": "fast"}, r"'mode' must be one of 'auto'"),
        ("fused_qkv", {"fuse_mlp": 1}, r"'fuse_mlp' must be bool, got int"),
    ],
)
def test_parameter_errors_are_one_line(name, params, message):
    with pytest.raises(CompoundError, match=message) as caught:
        get_transform(name, params)
    assert "\n" not in str(caught.value)


def test_parameters_fill_defaults_and_widen_int_to_float():
    transform = get_transform("token_pruning", {"keep_ratio": 1, "threshold": None})
    assert transform.values == {"layer": None, "keep_ratio": 1.0, "threshold": None}
    assert isinstance(transform.values["keep_ratio"], float)


def test_declared_conflict_names_both(tiny, test_transforms):
    specs = (TransformSpec("fused_qkv"), TransformSpec("test_clash"))
    with pytest.raises(CompoundError, match="transforms fused_qkv and test_clash conflict"):
        apply_transforms(tiny, specs)


def test_same_transform_twice_is_refused(tiny):
    specs = (TransformSpec("fused_qkv"), TransformSpec("fused_qkv", {"fuse_mlp": False}))
    with pytest.raises(CompoundError, match="fused_qkv is listed twice"):
        apply_transforms(tiny, specs)


def test_unmet_requirement_gives_skip_reason(tiny, test_transforms):
    transform = get_transform("test_needs_cuda")
    assert transform.check_requirements(tiny) == "needs a CUDA device (the model is on cpu)"
    with pytest.raises(CompoundError, match="transform test_needs_cuda skipped: needs a CUDA"):
        apply_transforms(tiny, (TransformSpec("test_needs_cuda"),))


def test_version_requirements(tiny):
    assert unmet_requirement("torch>=2.0", tiny) is None
    assert "torch" in unmet_requirement("torch>=999", tiny)
    assert "not installed" in unmet_requirement("no-such-package>=1", tiny)
    with pytest.raises(ValueError, match="unknown requirement"):
        unmet_requirement("a fast machine", tiny)


def test_targets_must_match_a_handle(tiny, test_transforms):
    with pytest.raises(CompoundError, match=r"targets \['layers.\*.cross_attention'\] match none"):
        apply_transforms(tiny, (TransformSpec("test_targets_nothing"),))


def test_pruning_layer_must_exist(tiny):
    with pytest.raises(CompoundError, match=r"'layer' must be < the number of decoder layers"):
        apply_one(tiny, "token_pruning", {"layer": 2})  # tiny has 2 layers


def test_targets_resolve_to_handles(tiny):
    assert get_transform("token_pruning", {"layer": 1}).target_handles(tiny) == [
        "layers.1.attention",
        "layers.1.mlp",
    ]
    assert get_transform("fused_qkv", {"fuse_mlp": False}).target_handles(tiny) == [
        "layers.0.attention",
        "layers.1.attention",
    ]
    assert set(get_transform("fused_qkv").target_handles(tiny)) <= set(tiny.handles())


# --- copy on apply ----------------------------------------------------------------------------
def _hook_counts(bundle: ModelBundle) -> list[tuple[int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in bundle.model.modules()]


@pytest.mark.parametrize(
    "spec",
    [
        TransformSpec("fused_qkv"),
        TransformSpec("vision_sleep"),
        TransformSpec("token_pruning", {"layer": 1}),
    ],
    ids=lambda s: s.name,
)
def test_apply_leaves_the_baseline_unchanged(spec):
    baseline = build_bundle("tiny", seed=0)
    request = image_request(baseline)
    before = prefill_logits(baseline, request)
    keys = set(baseline.model.state_dict())
    hooks = _hook_counts(baseline)  # transformers adds its own on the first forward
    transformed = apply_transforms(baseline, (spec,))
    assert transformed is not baseline
    generate(transformed, request, NEW_TOKENS)  # the transformed one runs (and its hooks fire)
    assert torch.equal(prefill_logits(baseline, request), before)
    assert set(baseline.model.state_dict()) == keys
    assert "transforms" not in baseline.metadata
    assert _hook_counts(baseline) == hooks
    assert [t["name"] for t in transformed.metadata["transforms"]] == [spec.name]


# --- lossless check ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "specs",
    [
        (TransformSpec("fused_qkv"),),
        (TransformSpec("fused_qkv", {"fuse_mlp": False}),),
        (TransformSpec("vision_sleep"),),
        (TransformSpec("vision_sleep"), TransformSpec("fused_qkv")),
    ],
    ids=lambda specs: "+".join(s.name for s in specs),
)
def test_lossless_transforms_pass_the_check(tiny, mixed, specs):
    result = check_lossless(tiny, apply_transforms(tiny, specs), mixed, NEW_TOKENS)
    assert result.ok, result.detail
    assert result.max_abs_diff <= 1e-4


def test_broken_transform_fails_the_check(tiny, mixed, test_transforms):
    broken = apply_transforms(tiny, (TransformSpec("test_broken"),))
    ok, max_abs_diff, detail = check_lossless(tiny, broken, mixed, NEW_TOKENS)
    assert not ok
    assert max_abs_diff > 1e-3
    assert "tolerance 0" in detail


def test_lossy_pruning_fails_the_check(tiny, mixed):
    pruned = apply_transforms(tiny, (TransformSpec("token_pruning", {"layer": 1}),))
    result = check_lossless(tiny, pruned, mixed, NEW_TOKENS)
    assert not result.ok
    assert "logit shapes differ in 3" in result.detail  # the three image requests


# --- vision sleep -----------------------------------------------------------------------------
def _vision_parameters(bundle: ModelBundle) -> list[torch.nn.Parameter]:
    return [*bundle.vision_encoder.parameters(), *bundle.projector.parameters()]


def _vision_bytes(bundle: ModelBundle) -> int:
    return sum(p.numel() * p.element_size() for p in _vision_parameters(bundle))


def _assert_asleep(bundle: ModelBundle) -> None:
    assert all(p.numel() == 0 for p in _vision_parameters(bundle))
    assert bundle.device.type == "cpu" and bundle.dtype == torch.float32  # still answerable


def _assert_sleep_cycle(baseline: ModelBundle, slept: ModelBundle) -> dict:
    """Image request wakes once, text request does not, outputs equal the baseline's; each wake
    is a span the harness's event tracker times."""
    record = slept.metadata["sleep"]
    slept.events.listener = tracker = EventTracker(slept.device)
    image, text = image_request(baseline), text_request(baseline)
    _assert_asleep(slept)
    assert record["wakes"] == 0
    assert torch.equal(generate(slept, image, NEW_TOKENS), generate(baseline, image, NEW_TOKENS))
    assert record["wakes"] == 1
    _assert_asleep(slept)
    assert torch.equal(generate(slept, text, NEW_TOKENS), generate(baseline, text, NEW_TOKENS))
    assert record["wakes"] == 1  # text-only never touches the vision tower or projector
    assert torch.equal(generate(slept, image, NEW_TOKENS), generate(baseline, image, NEW_TOKENS))
    assert record["wakes"] == 2
    wakes = [s for s in tracker.samples("sleep", 0, 0.0, 0.0) if s.metric == "sleep_wake_s"]
    assert len(wakes) == 2 and all(s.value > 0 and s.module == "vision_encoder" for s in wakes)
    assert record["asleep"] == ["projector", "vision_encoder"]
    return record


def test_sleep_without_checkpoint_keeps_a_host_copy(tiny):
    slept = apply_one(tiny, "vision_sleep")
    record = _assert_sleep_cycle(tiny, slept)
    assert record["mode"] == "cpu-copy"
    assert record["bytes_offloaded"] == _vision_bytes(tiny)
    assert record["bytes_freed"] == 0  # a CPU model keeping a host copy frees nothing
    assert "no safetensors checkpoint" in record["note"]


def test_sleep_reloads_from_the_checkpoint(tmp_path):
    save_checkpoint(build_bundle("tiny", seed=0), tmp_path / "tiny", {})
    loaded = load_model_dir(tmp_path / "tiny")
    slept = apply_one(loaded, "vision_sleep")
    record = _assert_sleep_cycle(loaded, slept)
    assert record["mode"] == "checkpoint"
    assert record["bytes_freed"] == _vision_bytes(loaded) > 0
    assert record["parameters"] == len(_vision_parameters(loaded))


def test_sleep_refuses_a_checkpoint_that_differs_from_memory(tmp_path):
    save_checkpoint(build_bundle("tiny", seed=0), tmp_path / "tiny", {})
    loaded = load_model_dir(tmp_path / "tiny")
    with torch.no_grad():
        next(loaded.projector.parameters()).add_(1.0)
    record = apply_one(loaded, "vision_sleep").metadata["sleep"]
    assert record["mode"] == "cpu-copy" and "differs from the checkpoint" in record["note"]
    with pytest.raises(CompoundError, match="mode 'checkpoint' unusable: in-memory"):
        apply_one(loaded, "vision_sleep", {"mode": "checkpoint"})


def test_sleep_can_keep_the_projector_awake(tiny):
    slept = apply_one(tiny, "vision_sleep", {"keep_projector_awake": True})
    generate(slept, image_request(tiny), NEW_TOKENS)
    assert all(p.numel() == 0 for p in slept.vision_encoder.parameters())
    assert all(p.numel() > 0 for p in slept.projector.parameters())
    assert slept.metadata["sleep"]["modules"] == ["vision_encoder"]


def test_cuda_pinned_mode_needs_cuda(tiny):
    with pytest.raises(CompoundError, match="'cuda-pinned' needs the model on a CUDA device"):
        apply_one(tiny, "vision_sleep", {"mode": "cuda-pinned"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sleep_on_gpu_frees_device_memory():
    baseline = build_bundle("tiny", seed=0, device="cuda")
    allocated = torch.cuda.memory_allocated()
    slept = apply_one(baseline, "vision_sleep")
    record = slept.metadata["sleep"]
    assert record["mode"] == "cuda-pinned" and record["bytes_freed"] == _vision_bytes(baseline)
    # the clone's language model is on the device, its vision weights are not
    clone_bytes = sum(p.numel() * p.element_size() for p in slept.model.parameters())
    assert torch.cuda.memory_allocated() - allocated <= clone_bytes + 2**20
    image = image_request(baseline)
    assert torch.equal(generate(slept, image, NEW_TOKENS), generate(baseline, image, NEW_TOKENS))
    assert record["wakes"] == 1 and all(p.numel() == 0 for p in _vision_parameters(slept))


# --- visual-token pruning ---------------------------------------------------------------------
def _sequence_lengths(bundle: ModelBundle) -> list[list[int]]:
    """Per decoder layer, the sequence length of each call (hooks run after the pruner's)."""
    seen: list[list[int]] = [[] for _ in bundle.decoder_layers]
    for i, layer in enumerate(bundle.decoder_layers):

        def record(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i].append(hidden.shape[1])

        layer.register_forward_pre_hook(record, with_kwargs=True)
    return seen


@pytest.mark.parametrize(("layer", "keep_ratio"), [(1, 0.75), (1, 0.3), (0, 0.5)])
def test_pruning_reduces_prefill_work_from_layer_k(tiny, layer, keep_ratio):
    pruned = apply_one(tiny, "token_pruning", {"layer": layer, "keep_ratio": keep_ratio})
    seen = _sequence_lengths(pruned)
    image = image_request(tiny)
    prompt = len(image.input_ids)
    kept = math.ceil(keep_ratio * TINY_IMAGE_TOKENS)
    generate(pruned, image, NEW_TOKENS)
    for i, lengths in enumerate(seen):
        # prefill, then one token per decode step
        expected = prompt if i < layer else prompt - TINY_IMAGE_TOKENS + kept
        assert lengths == [expected] + [1] * (NEW_TOKENS - 1)
    assert pruned.metadata["pruning"]["requests"] == [
        {
            "image_tokens": TINY_IMAGE_TOKENS,
            "kept": kept,
            "dropped": TINY_IMAGE_TOKENS - kept,
            "prompt_tokens": prompt,
            "pruned_prompt_tokens": prompt - TINY_IMAGE_TOKENS + kept,
        }
    ]


def test_pruning_leaves_text_requests_alone(tiny):
    pruned = apply_one(tiny, "token_pruning", {"layer": 1, "keep_ratio": 0.25})
    text = text_request(tiny)
    assert torch.equal(prefill_logits(pruned, text), prefill_logits(tiny, text))
    assert torch.equal(generate(pruned, text, NEW_TOKENS), generate(tiny, text, NEW_TOKENS))
    assert pruned.metadata["pruning"]["requests"] == []


def test_pruning_keeps_greedy_answers_close_to_the_baseline(tiny):
    """Bound for the untrained tiny model at keep_ratio 0.75 on 20 image requests: the first
    answer token agrees on at least 80% (measured 19/20) and all answer tokens on at least 60%
    (measured 79%). It is lossy: with a quarter of the image gone, some answers change."""
    pruned = apply_one(tiny, "token_pruning", {"layer": 1, "keep_ratio": 0.75})
    batch = requests(tiny, 20, 1.0)
    first = tokens = 0
    for request in batch:
        prompt = len(request.input_ids)
        expected = generate(tiny, request, 6)[0, prompt:]
        actual = generate(pruned, request, 6)[0, prompt:]
        first += int(expected[0] == actual[0])
        tokens += int((expected == actual).sum())
    assert first / len(batch) >= 0.8
    assert tokens / (6 * len(batch)) >= 0.6
    assert len(pruned.metadata["pruning"]["requests"]) == 20


def test_pruning_refuses_fixed_size_caches(tiny):
    pruned = apply_one(tiny, "token_pruning", {"layer": 1})
    with pytest.raises(CompoundError, match="needs a DynamicCache, got object"):
        pruned.model(**model_inputs(pruned, [image_request(tiny)]), past_key_values=object())


def test_pruning_with_all_tokens_kept_is_exact(tiny, mixed):
    pruned = apply_one(tiny, "token_pruning", {"layer": 1, "keep_ratio": 1.0})
    assert check_lossless(tiny, pruned, mixed, NEW_TOKENS).ok


@pytest.mark.parametrize(("threshold", "kept"), [(0.0, TINY_IMAGE_TOKENS), (1.0, 1)])
def test_pruning_threshold(tiny, threshold, kept):
    pruned = apply_one(tiny, "token_pruning", {"layer": 1, "threshold": threshold})
    generate(pruned, image_request(tiny), NEW_TOKENS)
    assert pruned.metadata["pruning"]["requests"][0]["kept"] == kept


def _masked_reference_logits(
    baseline: ModelBundle, request: Request, sequence: torch.Tensor, layer: int, kept: int
) -> torch.Tensor:
    """Logits of the baseline over the whole generated sequence (no cache), where layers ≥ K
    may not attend to the dropped image tokens: exactly what pruning computes for the kept
    positions, by a different route (masking, which saves nothing)."""
    reference = baseline.clone()
    captured = {}

    def capture(module, args, kwargs):
        captured.update(hidden=args[0], embeddings=kwargs["position_embeddings"])

    handle = reference.decoder_layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    inputs = model_inputs(reference, [request])
    with torch.inference_mode():
        reference.model(**inputs)
        scores = last_token_attention(
            reference.decoder_layers[layer], captured["hidden"], captured["embeddings"], None
        )
    handle.remove()
    image = inputs["input_ids"][0] == reference.model.config.image_token_id
    dropped = image.clone()
    dropped[scores[0].masked_fill(~image, -math.inf).topk(kept).indices] = False
    length = sequence.shape[1]
    blocked = torch.finfo(torch.float32).min
    mask = torch.full((length, length), blocked).triu(1)
    mask[:, dropped.nonzero()[:, 0]] = blocked

    def use_mask(module, args, kwargs):
        kwargs["attention_mask"] = mask[None, None]
        return args, kwargs

    for decoder_layer in reference.decoder_layers[layer:]:
        decoder_layer.register_forward_pre_hook(use_mask, with_kwargs=True)
    inputs.update(input_ids=sequence, attention_mask=torch.ones_like(sequence))
    with torch.inference_mode():
        return reference.model(**inputs, use_cache=False).logits[0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_pruned_generation_equals_masked_reference(tiny, attention):
    """Prefill and every cached decode step, with the attention mask absent (sdpa) or present
    and sliced by the hooks (eager)."""
    layer, keep_ratio, new_tokens = 1, 0.5, 5
    pruned = apply_one(tiny, "token_pruning", {"layer": layer, "keep_ratio": keep_ratio})
    pruned.model.set_attn_implementation(attention)
    request = image_request(tiny)
    tokenizer = tiny.prompts.tokenizer
    with torch.inference_mode():
        out = pruned.model.generate(
            **model_inputs(pruned, [request]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt = len(request.input_ids)
    kept = math.ceil(keep_ratio * TINY_IMAGE_TOKENS)
    reference = _masked_reference_logits(tiny, request, out.sequences, layer, kept)
    step_logits = torch.cat(out.logits)
    assert torch.allclose(step_logits, reference[prompt - 1 : -1], atol=1e-5, rtol=0)
    assert torch.equal(reference[prompt - 1 : -1].argmax(-1), out.sequences[0, prompt:])
    # layers < K cache every prompt position, layers ≥ K only the kept ones
    cache = out.past_key_values
    cached = prompt + new_tokens - 1
    assert cache.get_seq_length(0) == cached
    assert cache.get_seq_length(layer) == cached - (TINY_IMAGE_TOKENS - kept)


def test_pruning_a_batch_equals_pruning_each_request(tiny):
    """Rows keep different tokens; the gathers and the eager masks must stay per row."""
    pruned = apply_one(tiny, "token_pruning", {"layer": 1, "keep_ratio": 0.5})
    pruned.model.set_attn_implementation("eager")
    batch = [r for r in requests(tiny, 20, 1.0) if len(r.input_ids) == 24][:2]
    assert len(batch) == 2
    tokenizer = tiny.prompts.tokenizer

    def run(rows: list[Request]):
        with torch.inference_mode():
            return pruned.model.generate(
                **model_inputs(pruned, rows),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )

    together = run(batch)
    for row, request in enumerate(batch):
        alone = run([request])
        assert torch.equal(together.sequences[row], alone.sequences[0])
        steps = torch.stack(together.logits)[:, row]
        assert torch.allclose(steps, torch.stack(alone.logits)[:, 0], atol=1e-5, rtol=0)


def test_stacked_transforms_compose(tiny, mixed):
    """Fused projections and vision sleep are exact, so the stack answers as pruning alone."""
    prune = TransformSpec("token_pruning", {"layer": 1, "keep_ratio": 0.5})
    alone = apply_transforms(tiny, (prune,))
    stack = apply_transforms(
        tiny, (TransformSpec("vision_sleep"), TransformSpec("fused_qkv"), prune)
    )
    for request in mixed:
        expected = generate(alone, request, NEW_TOKENS)
        assert torch.equal(generate(stack, request, NEW_TOKENS), expected)
    assert stack.metadata["pruning"]["requests"] == alone.metadata["pruning"]["requests"]
    assert stack.metadata["sleep"]["wakes"] == 3
    names = [t["name"] for t in stack.metadata["transforms"]]
    assert names == ["vision_sleep", "fused_qkv", "token_pruning"]
