"""Distillation: the losses against hand-computed values, DP-SGD's clipping and noise, the
student's shape, training and storage, the `distill` transform in stacks, and the command."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.configuration import TransformSpec
from bench.judge.suite_verdict import hierarchical_prediction
from core.errors import CompoundError
from core.samples import PROCESS_KEY
from models.checkpoint import checkpoint_path, load_model_dir, load_trained, save_checkpoint
from models.dataset import make_examples
from models.distill import (
    Distiller,
    DistillRecipe,
    PrivacySettings,
    StudentShape,
    StudentSpec,
    aligned_layers,
    attention_alignment,
    build_student,
    clip_gradient,
    distill,
    hidden_alignment,
    noisy_mean,
    poisson_sample,
    private_step,
    soft_target_loss,
)
from models.evaluate import evaluate
from models.generation import generate
from models.presets import get_preset
from models.students import STUDENTS, find_student, student_path
from models.train import collate
from optimizations.registry import apply_transforms, check_order, get_transform

QUICK = DistillRecipe(steps=150, batch_size=16, learning_rate=3e-3, warmup_steps=10)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tiny_cache):
    return load_trained("tiny", tiny_cache)


@pytest.fixture(scope="module")
def student_dir(teacher, tmp_path_factory) -> Path:
    """A tiny student (1 decoder layer, 1 vision layer) distilled for 150 steps with every
    loss term on, saved like a cached one."""
    spec = StudentSpec(
        "test", "", StudentShape(1, 1), replace(QUICK, attention_weight=1.0, hidden_weight=1.0)
    )
    student = build_student(teacher, spec.shape)
    distill(teacher, student, spec.recipe, show_progress=False)
    path = tmp_path_factory.mktemp("students") / "tiny-student"
    save_checkpoint(student, path, {"student": spec.to_dict()})
    return path


# --- losses --------------------------------------------------------------------------------


def test_soft_target_loss_equals_the_hand_computed_value():
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    t = 2.0
    p = np.exp(teacher.numpy()[0] / t) / np.exp(teacher.numpy()[0] / t).sum()
    q = np.exp(student.numpy()[0] / t) / np.exp(student.numpy()[0] / t).sum()
    expected = t**2 * float((p * np.log(p / q)).sum())
    assert soft_target_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    assert soft_target_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_alignment_is_zero_for_identical_maps_and_grows_with_divergence():
    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    uniform = torch.full_like(teacher, 1 / 5)
    valid = torch.ones(2, 5, dtype=torch.bool)
    assert attention_alignment(teacher, teacher, valid).item() == pytest.approx(0.0, abs=1e-6)
    divergences = [
        attention_alignment((1 - w) * teacher + w * uniform, teacher, valid).item()
        for w in (0.1, 0.4, 0.8)
    ]
    assert 0 < divergences[0] < divergences[1] < divergences[2]
    # Padded query positions do not count; different head counts compare head means.
    masked = valid.clone()
    masked[:, -1] = False
    other = teacher.clone()
    other[:, :, -1] = uniform[:, :, -1]
    assert attention_alignment(other, teacher, masked).item() == pytest.approx(0.0, abs=1e-6)
    two_heads = teacher.reshape(2, 2, 2, 5, 5).mean(2)  # same mean over heads as the teacher
    assert attention_alignment(two_heads, teacher, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_alignment(two_heads.flip(-1), teacher, valid).item() > 0.01


def test_hidden_alignment_projects_a_narrower_student():
    student = torch.ones(1, 3, 2)
    teacher = torch.full((1, 3, 4), 2.0)
    valid = torch.ones(1, 3, dtype=torch.bool)
    projection = torch.nn.Linear(2, 4, bias=False)
    torch.nn.init.constant_(projection.weight, 1.0)  # each output = 1 + 1 = 2
    assert hidden_alignment(student, teacher, valid, projection).item() == pytest.approx(0.0)
    assert hidden_alignment(teacher * 0, teacher, valid).item() == pytest.approx(4.0)


# --- DP-SGD --------------------------------------------------------------------------------


def test_clipping_bounds_each_example_and_leaves_small_ones_alone():
    big = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]  # norm 13
    clipped, norm = clip_gradient(big, 1.0)
    assert norm == pytest.approx(13.0)
    assert math.sqrt(sum(float(g.pow(2).sum()) for g in clipped)) == pytest.approx(1.0)
    small = [torch.tensor([0.3, 0.4])]
    kept, _ = clip_gradient(small, 1.0)
    assert torch.equal(kept[0], small[0])


def test_noise_has_the_stated_scale():
    sigma, clip, batch = 1.3, 0.7, 20.0
    generator = torch.Generator().manual_seed(0)
    summed = [torch.full((50_000,), 4.0)]
    (noisy,) = noisy_mean(summed, sigma, clip, batch, generator)
    noise = noisy * batch - 4.0
    expected = sigma * clip
    # 50,000 draws: the sample SD's standard error is about 0.3%; the mean's is SD/224.
    assert noise.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean().item()) < 4 * expected / math.sqrt(50_000)


def test_poisson_sampling_rate():
    rng = np.random.default_rng(0)
    sizes = [len(poisson_sample(rng, 10_000, 0.01)) for _ in range(400)]
    assert np.mean(sizes) == pytest.approx(100, rel=0.03)
    assert np.var(sizes) == pytest.approx(100 * 0.99, rel=0.25)  # binomial variance


# --- the student ---------------------------------------------------------------------------


def test_aligned_layers_keep_the_first_and_last():
    assert aligned_layers(4, 2) == [0, 3]
    assert aligned_layers(4, 1) == [3]
    assert aligned_layers(4, 4) == [0, 1, 2, 3]
    assert aligned_layers(3, 2) == [0, 2]
    with pytest.raises(ValueError):
        aligned_layers(2, 3)


def test_student_is_smaller_and_starts_from_the_aligned_teacher_layers(teacher):
    student = build_student(teacher, StudentShape(1, 1))
    assert student.param_count() < 0.7 * teacher.param_count()
    assert len(student.decoder_layers) == 1
    assert torch.equal(
        student.decoder_layers[0].mlp.up_proj.weight, teacher.decoder_layers[-1].mlp.up_proj.weight
    )
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    narrow = build_student(teacher, StudentShape(1, 1, text_hidden=32, text_intermediate=64))
    assert narrow.model.config.text_config.hidden_size == 32
    assert narrow.param_count() < student.param_count()


def test_distilled_student_answers_well_above_chance(teacher, student_dir):
    student = load_model_dir(student_dir)
    result = evaluate(student, "val", 400)
    # Chance is about 1 in 4 on image questions and under 1 in 10 on text ones; the untrained
    # student starts near 0 (it has never produced an answer after one decoder layer).
    assert result.accuracy["image"] > 0.4, result.accuracy
    assert result.accuracy["text"] > 0.3, result.accuracy
    assert student.metadata["student"]["name"] == "test"
    # attention maps needed eager attention while training; serving gets its kernel back
    assert teacher.model.config._attn_implementation == "sdpa"


def test_student_save_and_reload_is_identical(teacher, tmp_path):
    student = build_student(teacher, StudentShape(1, 1))
    distill(teacher, student, replace(QUICK, steps=3), show_progress=False)
    save_checkpoint(student, tmp_path / "s", {})
    loaded = load_model_dir(tmp_path / "s")
    batch = collate(
        [student.prompts.encode(e) for e in make_examples(0, "test", 4)],
        loaded.prompts.tokenizer.pad_token_id,
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert torch.equal(student.model(**inputs).logits, loaded.model(**inputs).logits)


def test_private_distillation_spends_what_the_accountant_says(teacher):
    recipe = replace(QUICK, steps=4, privacy=PrivacySettings(8.0, private_examples=2_000))
    student = build_student(teacher, StudentShape(1, 1))
    result = distill(teacher, student, recipe, show_progress=False)
    spent = result.privacy
    assert spent is not None and spent.epsilon <= 8.0
    assert spent.sample_rate == pytest.approx(16 / 2_000) and spent.steps == 4
    assert spent.noise_multiplier > 0


def test_aprivate_step_without_noise_is_the_mean_of_clipped_gradients(teacher):
    # sigma 0 isolates the clipping: each of the n examples contributes a gradient of norm at
    # most C, so their sum over the expected batch has norm at most n·C / (q·N).
    recipe = replace(QUICK, privacy=PrivacySettings(8.0, clip_norm=0.01, private_examples=100))
    student = build_student(teacher, StudentShape(1, 1))
    distiller = Distiller(teacher, student, recipe)
    parameters = distiller.parameters()
    requests = [student.prompts.encode(e) for e in make_examples(3, "train", 6)]
    batches = [
        [r for r in requests if r.pixel_values is not None],
        [r for r in requests if r.pixel_values is None],
    ]
    pad = student.prompts.tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(0)
    private_step(distiller, batches, parameters, pad, 0.0, 0.1, generator)
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in parameters))
    expected_batch = 0.1 * 100
    assert 0 < norm <= 6 * 0.01 / expected_batch + 1e-9
    # with noise the same step lands elsewhere, by about sigma·C·sqrt(parameters)/(q·N)
    private_step(distiller, batches, parameters, pad, 1.0, 0.1, generator)
    noisy = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in parameters))
    count = sum(p.numel() for p in parameters)
    assert noisy == pytest.approx(0.01 * math.sqrt(count) / expected_batch, rel=0.1)


# --- the transform -------------------------------------------------------------------------


def test_distill_stacks_with_every_other_transform(teacher, student_dir):
    others = [name for name in ("vision_sleep", "token_pruning", "fused_qkv")]
    specs = [TransformSpec("distill", {"path": str(student_dir)})] + [
        TransformSpec(name, {}) for name in others
    ]
    stacked = apply_transforms(teacher, specs)
    assert len(stacked.decoder_layers) == 1 and len(teacher.decoder_layers) == 2
    applied = stacked.metadata["transforms"]
    assert [a["name"] for a in applied] == ["distill", *others]
    # Distillation names the teacher's modules it changes: all of them.
    assert set(applied[0]["targets"]) == set(teacher.handles())
    kept = applied[0]["figures"][0]
    assert kept["metric"] == "distill_params_kept" and 0 < kept["value"] < 1
    requests = [teacher.prompts.encode(e) for e in make_examples(0, "test", 2)]
    assert generate(stacked, requests[0], 3).shape[-1] == len(requests[0].input_ids) + 3


def test_distill_must_come_first():
    with pytest.raises(CompoundError, match="must come first"):
        check_order([get_transform("fused_qkv"), get_transform("distill")])


def test_missing_student_says_how_to_make_it(teacher):
    with pytest.raises(CompoundError) as caught:
        find_student(teacher, STUDENTS["kd"])
    message = str(caught.value)
    assert "compound distill --preset tiny --student kd" in message and "\n" not in message
    with pytest.raises(CompoundError, match="transform distill: no student"):
        get_transform("distill", {"student": "kd"}).validate_for(teacher)


def test_student_lives_beside_its_teacher(tiny_cache):
    teacher_dir = checkpoint_path(get_preset("tiny"), tiny_cache)
    path = student_path(teacher_dir, STUDENTS["kd"])
    assert path.parent == teacher_dir.parent
    assert path.name.startswith(f"{teacher_dir.name}-student-kd-")
    assert student_path(teacher_dir, STUDENTS["kd-attn"]) != path


# --- the commands --------------------------------------------------------------------------


def test_distill_command_trains_and_reports_a_custom_student(tiny_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    argv = ["distill", "--preset", "tiny", "--cache-dir", str(cache), "--steps", "20"]
    argv += ["--student-layers", "1", "--student-vision-layers", "1", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["student"] == "custom" and report["trained_now"] is True
    assert report["params_ratio"] < 0.7 and report["shape"]["decoder_layers"] == 1
    assert set(report["val_accuracy"]) == {"image", "text"}
    assert Path(report["path"]).is_dir()
    assert main(argv) == 0  # cached now
    assert json.loads(capsys.readouterr().out)["trained_now"] is False


def test_run_refuses_a_missing_student_before_making_a_directory(tiny_cache, tmp_path, capsys):
    argv = ["run", "--preset", "tiny", "--cache-dir", str(tiny_cache), "--transforms", "distill"]
    argv += ["--param", "distill.student=kd", "--results-dir", str(tmp_path / "results")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compound: error: transform distill: no student 'kd'"), err
    assert "\n" not in err and not (tmp_path / "results").exists()


def test_run_with_a_student_gives_a_verdict(tiny_cache, student_dir, tmp_path, capsys):
    argv = ["run", "--preset", "tiny", "--cache-dir", str(tiny_cache)]
    argv += ["--transforms", "distill,fused_qkv", "--param", f"distill.path={student_dir}"]
    argv += ["--requests", "3", "--new-tokens", "3", "--min-rounds", "10", "--min-seconds", "0"]
    argv += ["--threads", "1", "--processes", "2", "--eval-examples", "200", "--no-progress"]
    argv += ["--results-dir", str(tmp_path), "--run-id", "d", "--json", "--no-aa-control"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    configs = {row["config"] for row in report["summary"]}
    assert {"baseline", "distill", "fused_qkv", "distill+fused_qkv"} <= configs
    latency = next(v for v in report["verdict"]["metrics"] if v["label"] == "latency")
    assert latency["word"] and math.isfinite(latency["predicted_independent"]["point"])
    assert math.isfinite(latency["predicted_hierarchical"]["point"])
    accuracy = report["verdict"]["accuracy"]
    assert any("distill" in row["config"] for row in accuracy["rows"])


def _hooked_pass(config: str, block: int, epoch: int, modules: dict[str, float], total: float):
    extra = {PROCESS_KEY: epoch}
    rows = [
        {"config": config, "block": block, "metric": "module_time_s", "module": m, "value": v}
        for m, v in modules.items()
    ]
    rows.append(
        {"config": config, "block": block, "metric": "hooked_block_seconds", "module": "total"}
        | {"value": total}
    )
    return [row | {"extra": extra} for row in rows]


def test_hierarchical_prediction_counts_a_students_missing_layers_as_no_time():
    # Baseline: two layers of 3 s each and 4 s elsewhere. The student has only layer 0 (3 s)
    # and the same 4 s elsewhere: it saves layer 1's 3 s of 10, i.e. 30%.
    rows = []
    for block in range(6):
        epoch = block // 2
        rows += _hooked_pass("baseline", block, epoch, {"layers.0": 3.0, "layers.1": 3.0}, 10.0)
        rows += _hooked_pass("distill", block, epoch, {"layers.0": 3.0}, 7.0)
    prediction = hierarchical_prediction(pd.DataFrame(rows), ["distill"])
    assert prediction is not None
    assert prediction.point == pytest.approx(0.3)


def test_run_trains_a_missing_student_when_asked(tiny_cache, tmp_path, capsys, monkeypatch):
    import models.students

    # The named student's recipe, cut to 20 steps in this process only (workers just load it).
    def quick(teacher, student, recipe, **kwargs):
        return distill(teacher, student, replace(recipe, steps=20), **kwargs)

    monkeypatch.setattr(models.students, "distill", quick)
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    argv = ["run", "--preset", "tiny", "--cache-dir", str(cache), "--transforms", "distill"]
    argv += ["--param", "distill.student=kd", "--requests", "2", "--new-tokens", "2"]
    argv += ["--min-rounds", "2", "--min-seconds", "0", "--threads", "1", "--processes", "1"]
    argv += ["--eval-examples", "0", "--no-aa-control", "--no-progress"]
    argv += ["--results-dir", str(tmp_path / "results"), "--run-id", "t"]
    assert main(argv) == 2  # missing: refused, nothing made
    assert "no student 'kd'" in capsys.readouterr().err
    assert main([*argv, "--train-students", "--json"]) == 0
    teacher_dir = checkpoint_path(get_preset("tiny"), cache)
    assert student_path(teacher_dir, STUDENTS["kd"]).is_dir()
    report = json.loads(capsys.readouterr().out)
    assert {row["config"] for row in report["summary"]} >= {"baseline", "distill"}


def test_distill_list_names_every_student(capsys):
    assert main(["distill", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listed] == list(STUDENTS)
    assert all(s["shape"]["decoder_layers"] >= 1 for s in listed)
    assert main(["distill", "--list"]) == 0
    assert "kd-attn (default)" in capsys.readouterr().out
