"""Serving-systems techniques (paper 2.3, 3.1): modality routing, the vision-embedding cache
and the workload's image reuse, page-aligned mapped weights (mmap_load) and the cold start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from bench.cli import main
from bench.configuration import Configuration, TransformSpec, WorkloadSpec
from bench.measure import coldstart
from bench.measure.coldstart import ColdStart, evict, summarize
from bench.measure.workload import build_requests, repeat_count, reuse_images
from core.errors import CompoundError
from models.aligned_weights import PAGE, data_offsets, read_tensors, write_aligned
from models.checkpoint import build_bundle, checkpoint_path, load_model_dir
from models.dataset import make_examples
from models.generation import generate, model_inputs
from models.presets import get_preset
from models.vision_cache import VisionCache, image_key
from optimizations.registry import apply_transforms
from tests.test_run import QUICK


@pytest.fixture(scope="module")
def trained_tiny(tiny_cache):
    return load_model_dir(checkpoint_path(get_preset("tiny"), tiny_cache))


def _requests(bundle, count, image_fraction=0.5, reuse=0.0):
    spec = WorkloadSpec(requests_per_block=count, image_fraction=image_fraction, image_reuse=reuse)
    return build_requests(bundle, spec)


def _logits(bundle, requests):
    with torch.inference_mode():
        return bundle.model(**model_inputs(bundle, requests)).logits


def _same_outputs(baseline, transformed, requests):
    for group in ([r] for r in requests):
        assert torch.equal(_logits(transformed, group), _logits(baseline, group))
        assert torch.equal(generate(transformed, group, 4), generate(baseline, group, 4))
    assert torch.equal(generate(transformed, requests, 4), generate(baseline, requests, 4))


# --- modality routing ---------------------------------------------------------------------------
def test_routing_gives_identical_tokens_and_logits(trained_tiny):
    routed = apply_transforms(trained_tiny, (TransformSpec("modality_routing"),))
    _same_outputs(trained_tiny, routed, _requests(trained_tiny, 6))
    assert routed.param_count() == trained_tiny.param_count()


def test_text_requests_skip_the_multimodal_wrapper(trained_tiny):
    routed = apply_transforms(trained_tiny, (TransformSpec("modality_routing"),))
    calls = []
    routed.model.model.register_forward_hook(lambda *args: calls.append(1))
    text, image = (_requests(trained_tiny, 1, fraction) for fraction in (0.0, 1.0))
    generate(routed, text, 3)
    _logits(routed, text)
    assert calls == []
    generate(routed, image, 3)  # an image request's every step stays on the full path
    assert len(calls) == 3
    static = generate(routed, text, 3, engine="static", cache_length=64)
    assert torch.equal(static, generate(trained_tiny, text, 3, engine="static", cache_length=64))


# --- vision cache -------------------------------------------------------------------------------
def test_vision_cache_gives_identical_outputs_and_hits_repeats(trained_tiny):
    cached = apply_transforms(trained_tiny, (TransformSpec("vision_cache"),))
    requests = _requests(trained_tiny, 8, reuse=0.75)
    seen = []
    cached.events.listener = type(
        "Listener",
        (),
        {"value": lambda self, name, value, unit, module: seen.append((name, value))},
    )()
    (cache,) = cached.block_states
    cache.begin_block()
    _same_outputs(trained_tiny, cached, requests)
    assert cache.hits > 0
    cache.end_block()
    assert seen[0][0] == "vision_cache_hit_rate" and 0 < seen[0][1] < 1
    assert cache.entries == {} and cache.lookups == 0


def test_the_key_follows_the_image_not_the_question(trained_tiny):
    first, second = (trained_tiny.prompts.encode(e) for e in make_examples(3, "test", 2, 1.0))
    assert first.input_ids != second.input_ids
    assert image_key(first.pixel_values) == image_key(first.pixel_values.clone())
    assert image_key(first.pixel_values) != image_key(second.pixel_values)
    changed = first.pixel_values.clone()
    changed[0, 0, 0] += 1e-3
    assert image_key(changed) != image_key(first.pixel_values)


def test_eviction_keeps_both_bounds_least_recently_used_first():
    cache = VisionCache(max_entries=3, max_bytes=3 * 400, events=None)
    tensors = {name: torch.zeros(100) for name in "abcde"}  # 400 bytes each
    for name in "abc":
        cache.put(name, tensors[name])
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", tensors["d"])
    assert list(cache.entries) == ["c", "a", "d"] and cache.evictions == 1
    cache.put("big", torch.zeros(400))  # larger than the whole cache: not kept
    assert "big" not in cache.entries
    small = VisionCache(max_entries=10, max_bytes=1000, events=None)
    for name in "abcde":
        small.put(name, tensors[name])
        assert small.bytes <= 1000 and len(small.entries) <= 10
    assert list(small.entries) == ["d", "e"]


@pytest.mark.parametrize("reuse", [0.0, 0.5, 0.9, 1.0])
def test_image_reuse_gives_the_stated_share_of_repeats(trained_tiny, reuse):
    original = _requests(trained_tiny, 40)
    reused = reuse_images(original, reuse, seed=0)
    positions = [i for i, r in enumerate(original) if r.pixel_values is not None]
    repeats = [i for i in positions if reused[i].pixel_values is not original[i].pixel_values]
    assert len(repeats) == repeat_count(len(positions), reuse) == min(round(reuse * 20), 19)
    assert positions[0] not in repeats
    originals = [original[i].pixel_values for i in positions if i not in repeats]
    for i in repeats:
        earlier = [p for j, p in zip(positions, originals, strict=False) if j < i]
        assert any(reused[i].pixel_values is p for p in originals)
        assert earlier  # something earlier to repeat
        assert reused[i].input_ids == original[i].input_ids  # the question stays its own
    assert [r.input_ids for r in reused] == [r.input_ids for r in original]


def test_a_run_reports_the_hit_rate_of_each_block(tiny_cache, tmp_path):
    quick = list(QUICK)
    quick[quick.index("--transforms") + 1] = "vision_cache"
    quick[quick.index("--requests") + 1] = "8"
    args = ["run", *quick, "--image-reuse", "0.5", "--cache-dir", str(tiny_cache)]
    args += ["--results-dir", str(tmp_path), "--run-id", "cache", "--no-aa-control"]
    assert main(args) == 0
    rates = []
    for line in (tmp_path / "cache" / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        if sample.get("metric") == "vision_cache_hit_rate" and sample["block"] >= 0:
            rates.append(sample["value"])
    # 4 image requests, 2 of them repeats, one pass per block: every block hits 2 of 4
    assert rates and set(rates) == {0.5}


# --- mapped weights and the cold start ----------------------------------------------------------
def test_aligned_file_is_page_aligned_and_readable_by_safetensors(tmp_path):
    tensors = {
        "b": torch.arange(5, dtype=torch.float32),
        "a": torch.ones(3, 7, dtype=torch.bfloat16),
    }
    path = tmp_path / "w.safetensors"
    write_aligned(tensors, path)
    assert all(offset % PAGE == 0 for offset in data_offsets(path).values())
    back = read_tensors(path)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[name], tensors[name]) for name in tensors)
    with safe_open(path, framework="pt") as source:  # pads are ordinary tensors to a reader
        assert any(name.startswith("__pad__.") for name in source.keys())  # noqa: SIM118


def test_mapped_and_copied_loads_give_identical_tensors(tiny_cache, isolated_cache):
    directory = checkpoint_path(get_preset("tiny"), tiny_cache)
    copied = load_model_dir(directory)
    mapped = load_model_dir(directory, mapped=True)
    assert mapped.metadata["weights"] == "mapped" and "weights" not in copied.metadata
    for (name, a), (_, b) in zip(
        copied.model.state_dict().items(), mapped.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert all(p.data_ptr() % PAGE == 0 for p in mapped.model.parameters())
    assert any((isolated_cache / "aligned").iterdir())


def test_mmap_load_maps_a_loaded_model_and_keeps_its_outputs(trained_tiny, isolated_cache):
    mapped = apply_transforms(trained_tiny, (TransformSpec("mmap_load"),))
    assert mapped.metadata["weights"] == "mapped"
    _same_outputs(trained_tiny, mapped, _requests(trained_tiny, 4))
    with pytest.raises(CompoundError, match="skipped: needs its weights in a checkpoint"):
        apply_transforms(build_bundle("tiny", seed=0), (TransformSpec("mmap_load"),))
    with pytest.raises(CompoundError, match="must come first"):
        apply_transforms(trained_tiny, (TransformSpec("fused_qkv"), TransformSpec("mmap_load")))


def test_phase_timer_on_a_fake_loader_of_known_duration(monkeypatch, tmp_path):
    fake = (
        "import json, time; s = time.time(); time.sleep(0.2); i = time.time(); "
        "time.sleep(0.5); l = time.time(); time.sleep(0.1); f = time.time(); "
        "print(json.dumps(dict(started=s, imported=i, loaded=l, first_token=f, major_faults=3, "
        "minor_faults=4, block_reads=5, peak_rss_kib=2048)))"
    )
    monkeypatch.setattr(coldstart, "aligned_copy", lambda directory, dtype: tmp_path)
    monkeypatch.setattr(coldstart, "evict", lambda files, how: "fake")
    monkeypatch.setattr(coldstart, "_child_command", lambda settings: [sys.executable, "-c", fake])
    result = coldstart.cold_start(tmp_path, Configuration("baseline"), "float32", 1, "weights", 0)
    assert 0.2 <= result.import_s < 2.2 and 0.5 <= result.load_s < 2.5
    assert 0.1 <= result.first_token_s < 2.1
    phases = result.spawn_s + result.import_s + result.load_s + result.first_token_s
    assert result.total_s == pytest.approx(phases, abs=1e-6)
    assert (result.major_faults, result.peak_rss_mib) == (3, 2.0)


def test_summary_of_known_ratios():
    def run(config, repeat, load):
        return ColdStart(config, repeat, 0.0, 1.0, load, 0.1, 1.1 + load, 0, 0, 0, 1.0, "x")

    results = [run("baseline", r, 2.0 + r) for r in range(5)]
    results += [run("mmap_load", r, (2.0 + r) / 4) for r in range(5)]
    summary = summarize(results)
    ratio = summary["speedup"]["mmap_load"]["load_s"]
    assert ratio["median"] == pytest.approx(4.0)
    assert ratio["low"] == pytest.approx(4.0) and ratio["high"] == pytest.approx(4.0)
    assert summary["medians"]["baseline"]["load_s"] == 4.0


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_eviction_leaves_no_page_of_the_weights_resident(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * (64 * PAGE))
    path.read_bytes()
    assert "page" in evict([path], "weights")

    def resident() -> int:
        output = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(output.stdout.split()[0])

    assert resident() == 0


def test_coldstart_end_to_end_on_tiny(tiny_cache, isolated_cache, capsys):
    code = main(
        [
            "coldstart",
            "--preset",
            "tiny",
            "--repeats",
            "1",
            "--cache-dir",
            str(tiny_cache),
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["medians"]) == ["baseline", "mmap_load"]
    for process in report["processes"]:
        assert 0 < process["load_s"] < process["total_s"]
        assert process["eviction"].startswith("the weight files' pages evicted")


def test_named_suites_and_their_errors(capsys):
    assert main(["run", "--suite", "systems", "--transforms", "fused_qkv"]) == 2
    assert "give one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--image-reuse", "1.5"])
    assert "fraction in [0, 1]" in capsys.readouterr().err
