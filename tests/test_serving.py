"""Serving settings: engines, batches and dtypes give the same answers; the plumbing around them."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from bench.cli import main
from bench.commands.common import batch_sizes, serving_for
from bench.configuration import ServingSpec, TransformSpec, WorkloadSpec
from bench.measure.preflight import unmet_requirements
from bench.measure.workload import batches, build_requests, cache_length
from core.errors import CompoundError
from models.checkpoint import load_trained
from models.generation import check_engine, engine_options, generate, model_inputs
from optimizations.registry import get_transform

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def trained(tiny_cache):
    return load_trained("tiny", tiny_cache)


@pytest.fixture(scope="module")
def workload(trained):
    return build_requests(trained, WorkloadSpec(requests_per_block=6, image_fraction=0.5))


def new_tokens(output: torch.Tensor) -> torch.Tensor:
    return output[:, -NEW_TOKENS:]


def test_the_workload_has_prompts_of_unequal_length(workload):
    """Otherwise the batching tests below would not exercise the padding."""
    assert len({len(r.input_ids) for r in workload}) > 1
    assert {r.example.modality for r in workload} == {"image", "text"}


def greedy(bundle, request, **engine):
    """Tokens and every step's logits of one greedy generation."""
    tokenizer = bundle.prompts.tokenizer
    with torch.inference_mode():
        out = bundle.model.generate(
            **model_inputs(bundle, [request]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            **engine_options(**engine),
        )
    return out.sequences, torch.stack(out.logits)


def test_static_engine_gives_eagers_tokens_and_logits(trained, workload):
    length = cache_length(workload, NEW_TOKENS)
    for request in workload:
        tokens, logits = greedy(trained, request, engine="eager")
        static_tokens, static_logits = greedy(
            trained, request, engine="static", cache_length=length
        )
        assert torch.equal(tokens, static_tokens)
        assert torch.allclose(logits, static_logits, atol=1e-4, rtol=0)
        assert torch.equal(tokens, generate(trained, request, NEW_TOKENS, engine="static"))


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_batch_gives_each_request_the_tokens_it_gets_alone(trained, workload, engine):
    length = cache_length(workload, NEW_TOKENS)
    alone = torch.cat(
        [
            new_tokens(generate(trained, r, NEW_TOKENS, engine=engine, cache_length=length))
            for r in workload
        ]
    )
    together = new_tokens(
        generate(trained, workload, NEW_TOKENS, engine=engine, cache_length=length)
    )
    assert torch.equal(together, alone)


def test_padding_is_on_the_left_with_a_zero_mask(trained, workload):
    inputs = model_inputs(trained, workload)
    longest = max(len(r.input_ids) for r in workload)
    pad = trained.prompts.tokenizer.pad_token_id
    rows = zip(inputs["input_ids"], inputs["attention_mask"], workload, strict=True)
    for row, mask, request in rows:
        padding = longest - len(request.input_ids)
        assert row[padding:].tolist() == request.input_ids
        assert row[:padding].tolist() == [pad] * padding
        assert mask.tolist() == [0] * padding + [1] * len(request.input_ids)
    images = sum(r.pixel_values is not None for r in workload)
    assert inputs["pixel_values"].shape[0] == images


def test_equal_prompts_are_not_padded(trained, workload):
    text = [r for r in workload if r.pixel_values is None][:1] * 3
    inputs = model_inputs(trained, text)
    assert "pixel_values" not in inputs
    assert bool(inputs["attention_mask"].all())


def test_batches_hold_the_blocks_image_fraction(workload):
    images = sum(r.pixel_values is not None for r in workload)
    assert images == 3  # the premise: half of six
    assert batches(workload, 1) == [[r] for r in workload]
    for size, count in ((2, 3), (4, 2), (6, 1), (32, 1)):
        cut = batches(workload, size)
        assert len(cut) == count and all(len(batch) == size for batch in cut)
        for batch in cut:
            assert sum(r.pixel_values is not None for r in batch) == round(size / 2)
    # a batch larger than the block repeats every request about equally
    big = batches(workload, 32)[0]
    counts = {id(r): sum(b is r for b in big) for r in workload}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_batches_of_a_one_modality_block_take_only_that_modality(trained):
    texts = build_requests(trained, WorkloadSpec(requests_per_block=4, image_fraction=0.0))
    for batch in batches(texts, 3):
        assert all(r.pixel_values is None for r in batch) and len(batch) == 3


def test_cache_length_fits_the_longest_prompt_and_the_new_tokens(workload):
    assert cache_length(workload, 5) == max(len(r.input_ids) for r in workload) + 5


def test_engine_options_select_the_cache_and_the_compile():
    assert engine_options("eager") == {}
    static = engine_options("static", 40)
    assert static["cache_implementation"] == "static" and static["max_cache_len"] == 40
    assert static["disable_compile"] is True and "compile_config" not in static
    graphs = engine_options("graphs", 40)
    assert graphs["compile_config"].mode == "reduce-overhead"
    assert "disable_compile" not in graphs
    with pytest.raises(CompoundError, match="unknown engine"):
        engine_options("turbo")


def test_graphs_need_cuda():
    with pytest.raises(CompoundError, match="needs a CUDA device"):
        check_engine("graphs", "cpu")
    check_engine("static", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_engine_gives_eagers_tokens_on_cuda(tiny_cache):
    bundle = load_trained("tiny", tiny_cache, device="cuda")
    requests = build_requests(bundle, WorkloadSpec(requests_per_block=4))
    length = cache_length(requests, NEW_TOKENS)
    for _ in range(3):  # the first calls compile and record; later ones replay the graph
        for request in requests:
            eager = generate(bundle, request, NEW_TOKENS)
            graphs = generate(bundle, request, NEW_TOKENS, engine="graphs", cache_length=length)
            assert torch.equal(eager, graphs)


def namespace(**values) -> argparse.Namespace:
    return argparse.Namespace(**{"engine": "auto", "dtype": "auto", "batch_size": (1,), **values})


def test_auto_serving_is_eager_float32_on_cpu_and_graphs_bfloat16_on_cuda():
    assert serving_for(namespace(), "cpu") == ("float32", ServingSpec("eager", (1,)))
    assert serving_for(namespace(), "cuda") == ("bfloat16", ServingSpec("graphs", (1,)))
    chosen = namespace(engine="static", dtype="float16", batch_size=(8, 1))
    assert serving_for(chosen, "cuda:0") == ("float16", ServingSpec("static", (8, 1)))
    with pytest.raises(CompoundError, match="needs a CUDA device"):
        serving_for(namespace(engine="graphs"), "cpu")


def test_batch_size_lists_parse_and_bad_ones_are_refused():
    assert batch_sizes("8") == (8,)
    assert batch_sizes("1, 8,32") == (1, 8, 32)
    for bad in ("0", "1,1", "a", "1,,2", "-4"):
        with pytest.raises(argparse.ArgumentTypeError):
            batch_sizes(bad)


def test_token_pruning_is_incompatible_with_a_static_cache(trained):
    pruning = get_transform("token_pruning", {})
    assert pruning.engine_problem("eager") is None
    assert "incompatible with engine static" in pruning.engine_problem("static")
    assert "DynamicCache" in pruning.engine_problem("graphs")
    specs = (TransformSpec("token_pruning", {}), TransformSpec("fused_qkv", {}))
    assert unmet_requirements(specs, trained, "eager") == {}
    assert set(unmet_requirements(specs, trained, "static")) == {"token_pruning"}
    assert get_transform("fused_qkv", {}).engine_problem("graphs") is None


def test_bfloat16_serves_and_its_tolerance_is_scaled(tiny_cache, workload):
    bundle = load_trained("tiny", tiny_cache, dtype=torch.bfloat16)
    assert bundle.dtype == torch.bfloat16
    output = generate(bundle, workload[:2], NEW_TOKENS)
    assert output.shape == (2, max(len(r.input_ids) for r in workload[:2]) + NEW_TOKENS)
    fused = get_transform("fused_qkv", {})
    assert fused.tolerance_for(torch.float32) == fused.tolerance
    assert fused.tolerance_for(torch.bfloat16) == 4 * 16 * 2**-7  # 4 ulps at |logit| 16
    assert fused.tolerance_for(torch.float16) == 4 * 16 * 2**-10
    assert get_transform("vision_sleep", {}).tolerance_for(torch.bfloat16) == 0.0  # exact
    assert get_transform("token_pruning", {}).tolerance_for(torch.bfloat16) == 0.0  # lossy


SWEEP = ["--preset", "tiny", "--transforms", "fused_qkv", "--design", "singles"]
SWEEP += ["--requests", "4", "--new-tokens", "2", "--min-seconds", "0", "--min-rounds", "2"]
SWEEP += ["--processes", "2", "--threads", "1", "--eval-examples", "0", "--no-progress"]


def test_a_batch_sweep_compares_sizes_in_the_same_rounds(tiny_cache, tmp_path, capsys):
    code = main(
        ["run", *SWEEP, "--cache-dir", str(tiny_cache), "--results-dir", str(tmp_path)]
        + ["--run-id", "sweep", "--batch-size", "1,3", "--engine", "static", "--json"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    run = tmp_path / "sweep"
    stored = json.loads((run / "run.json").read_text())
    assert stored["config"]["serving"] == {"engine": "static", "batch_sizes": [1, 3]}
    assert stored["config"]["source"]["dtype"] == "float32"
    assert stored["memory_plan"]["workers_alive_at_once"] == 3  # baseline, fused_qkv, A/A
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    latency = [s for s in samples if s.get("metric") == "latency_mean_s"]
    by_size = {(s["config"], s["block"], s["extra"]["batch_size"]) for s in latency}
    for config in ("baseline", "fused_qkv"):
        for block in (0, 1):
            assert {(config, block, 1), (config, block, 3)} <= by_size
    batched = [
        s for s in samples if s.get("metric") == "latency_e2e_s" and "requests" in s["extra"]
    ]
    assert batched and all(s["extra"]["requests"] == 3 for s in batched)
    assert all(s["extra"]["images"] == 2 for s in batched)  # round(3 × 2/4)
    assert report["verdict"]["batch_size"] == 1
    assert set(report["verdict"]["by_batch_size"]) == {"3"}
    sizes = {(row["config"], row["batch_size"]) for row in report["batches"]}
    assert {("baseline", 1), ("baseline", 3)} <= sizes
    firsts = [r for r in report["batches"] if r["metric"] == "throughput_rps"]
    assert all(r["throughput_x"] == 1.0 for r in firsts if r["batch_size"] == 1)
    assert "## Batch sizes" in (run / "report.md").read_text()
    assert (run / "batches.csv").read_text().startswith("config,batch_size,metric")


def test_per_token_energy_rows_come_with_every_block(tiny_cache, tmp_path, capsys):
    code = main(
        ["run", *SWEEP, "--cache-dir", str(tiny_cache), "--results-dir", str(tmp_path)]
        + ["--run-id", "energy", "--processes", "1", "--no-aa-control", "--json"]
    )
    assert code == 0
    capsys.readouterr()
    text = (tmp_path / "energy" / "samples.jsonl").read_text()
    samples = [json.loads(line) for line in text.splitlines()]
    energy = {(s["config"], s["block"]): s for s in samples if s.get("metric") == "energy_j"}
    per_token = [s for s in samples if s.get("metric") == "energy_per_token_j"]
    assert per_token
    for row in per_token:
        window = energy[(row["config"], row["block"])]
        assert row["source"] == window["source"]
        assert math.isclose(row["value"], window["value"] / row["extra"]["tokens"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--engine", "graphs", "--device", "cpu"], "needs a CUDA device"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "2,2"], "distinct"),
        (["--batch-size", "9999"], "--batch-size must be at most"),
        (["--dtype", "int8"], "--dtype"),
    ],
)
def test_bad_serving_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    try:
        code = main(["run", *SWEEP, "--results-dir", str(tmp_path), *flags])
    except SystemExit as usage_error:  # argparse's own errors
        code = usage_error.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_a_run_that_would_not_fit_in_memory_stops_before_its_directory_exists(
    tiny_cache, tmp_path, capsys, monkeypatch
):
    from bench import suite

    monkeypatch.setattr(suite, "free_bytes", lambda device: 64 * 2**20)  # 64 MiB free
    code = main(
        ["run", *SWEEP, "--cache-dir", str(tiny_cache), "--results-dir", str(tmp_path)]
        + ["--run-id", "too-big", "--batch-size", "4"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "not even one worker fits" in err[0] and "64.0 MiB is free" in err[0]
    assert "--batch-size (now 4)" in err[0]
    assert not (tmp_path / "too-big").exists()


def test_a_set_max_alive_that_does_not_fit_names_it(tiny_cache, tmp_path, capsys, monkeypatch):
    from bench import suite
    from bench.measure import memory_plan

    one = memory_plan.CPU_RUNTIME_BYTES + 32 * 2**20  # room for about one tiny worker
    monkeypatch.setattr(suite, "free_bytes", lambda device: int(1.6 * one / 0.9))
    code = main(
        ["run", *SWEEP, "--cache-dir", str(tiny_cache), "--results-dir", str(tmp_path)]
        + ["--run-id", "set", "--max-alive", "3"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "3 workers alive at once" in err[0], err


def test_when_memory_allows_fewer_workers_an_epoch_runs_in_groups(
    tiny_cache, tmp_path, capsys, monkeypatch
):
    from bench import suite
    from bench.measure import memory_plan

    one = memory_plan.CPU_RUNTIME_BYTES + 32 * 2**20
    monkeypatch.setattr(suite, "free_bytes", lambda device: int(2.5 * one / 0.9))
    code = main(
        ["run", *SWEEP, "--cache-dir", str(tiny_cache), "--results-dir", str(tmp_path)]
        + ["--run-id", "groups", "--json"]
    )
    assert code == 0
    capsys.readouterr()
    stored = json.loads((tmp_path / "groups" / "run.json").read_text())
    assert stored["config"]["protocol"]["max_alive"] == 2
    assert stored["memory_plan"]["workers_alive_at_once"] == 2
    assert stored["memory_plan"]["lowered_from"] == 3
    text = (tmp_path / "groups" / "samples.jsonl").read_text()
    samples = [json.loads(line) for line in text.splitlines()]
    rounds = {(s["config"], s["block"]) for s in samples if s.get("metric") == "latency_mean_s"}
    for config in ("baseline", "baseline-aa", "fused_qkv"):  # the same round numbers for all
        assert {(config, 0), (config, 1)} <= rounds
    starts = [s for s in samples if s.get("metric") == "worker_start_s"]
    assert len(starts) == 3 * 2  # one process per configuration per epoch, groups or not


def test_alive_groups_cover_every_configuration_once_per_epoch():
    from bench.measure.runner import alive_groups

    names = [f"c{i}" for i in range(7)]
    assert alive_groups(names, 0, 0, 0) == [names]
    assert alive_groups(names, 7, 0, 0) == [names]
    for epoch in range(3):
        groups = alive_groups(names, 3, 0, epoch)
        assert [len(g) for g in groups] == [3, 3, 1]
        assert sorted(n for g in groups for n in g) == names
    assert alive_groups(names, 3, 0, 0) != alive_groups(names, 3, 0, 1)


def test_a_block_served_at_two_sizes_is_one_round_when_a_run_resumes(tmp_path):
    from bench.measure.runner import _stored_rounds
    from bench.store import RunStore
    from core.samples import Sample

    with RunStore.create(tmp_path, {}, {}, run_id="r") as store:
        for block in (0, 1):
            samples = [
                Sample("base", block, "block_seconds", seconds, "s", extra={"batch_size": size})
                for size, seconds in ((1, 2.0), (8, 0.5))
            ]
            store.append_block("base", block, samples)
        rounds = _stored_rounds(store)
    assert len(rounds) == 2
    assert rounds["seconds"].tolist() == [2.5, 2.5]


def test_hook_overhead_is_taken_against_one_unhooked_pass(tiny_cache, monkeypatch):
    """A block that serves its batches several times (to last min_block_seconds) hands the
    hooked pass the time of one pass, not of the whole block."""
    from bench.configuration import Configuration, ModelSource, Protocol, RunSpec
    from bench.measure.worker import Worker

    spec = RunSpec(
        source=ModelSource(preset="tiny", cache_dir=str(tiny_cache)),
        configurations=(Configuration("baseline"),),
        workload=WorkloadSpec(requests_per_block=2, new_tokens=2),
        protocol=Protocol(min_block_seconds=0.3, module_pass_every=1, threads=1),
        serving=ServingSpec("eager", (1, 2)),
    )
    worker = Worker(spec, spec.configurations[0])
    handed: list[float] = []
    monkeypatch.setattr(worker, "module_pass", lambda block, seconds: handed.append(seconds) or [])
    samples = worker.run_block(0)
    primary = [s for s in samples if s.extra.get("batch_size") == 1]
    wall = next(s.value for s in primary if s.metric == "block_seconds")
    served = [s for s in primary if s.metric == "latency_e2e_s"]
    passes = len(served) // 2
    assert passes >= 2  # the premise: 0.3 s takes several passes of two tiny requests
    assert handed == [pytest.approx(wall / passes)]
    sizes = {s.extra.get("batch_size") for s in samples if s.metric == "block_seconds"}
    assert sizes == {1, 2}  # and the module pass ran at the primary size only (once)
