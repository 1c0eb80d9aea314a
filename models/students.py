"""Named students of a trained preset, and their checkpoints beside the teacher's in the cache.

A student's directory is `<teacher dir>-student-<name>-<key>`, where the key hashes the
teacher's directory name (which holds the teacher's own key), the student's shape and its
recipe: change any of them and a stale student is simply not found.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.checkpoint import (
    check_cache_dir,
    load_model_dir,
    remove_stale_staging,
    save_checkpoint,
)
from models.distill import (
    DistillRecipe,
    PrivacySettings,
    StudentShape,
    StudentSpec,
    build_student,
    distill,
)
from models.evaluate import evaluate

# One decoder layer of four and two vision layers of three: `small`'s time goes to each decoder
# layer (about 2.5 ms of 19 ms per request, measured; the vision tower costs little), so only
# a one-layer decoder is 1.6x faster. Chosen on the validation split: see the README's
# distillation record.
DEFAULT_SHAPE = StudentShape(decoder_layers=1, vision_layers=2)
_KD = DistillRecipe(
    steps=2500,
    alpha=0.5,
    temperature=2.0,
    # The teacher's own mix: the kinds that learn slowest are seen more often.
    kind_weights=(("larger", 2.0), ("position", 3.0), ("smaller", 2.0)),
)
# DP-SGD clips every example's gradient on its own (one backward pass each): a step costs a
# batch of backward passes (0.4 s at 32 on 2 cores, measured), so fewer steps; larger batches,
# because the noise on the mean gradient is σC/B.
_DP = {"steps": 500, "batch_size": 64}
STUDENTS: dict[str, StudentSpec] = {
    s.name: s
    for s in (
        StudentSpec("kd", "soft-target KD (T=2, α=0.5) with the hard labels", DEFAULT_SHAPE, _KD),
        StudentSpec(
            "kd-attn",
            "KD plus attention-map and hidden-state alignment of aligned layers",
            DEFAULT_SHAPE,
            replace(_KD, attention_weight=1.0, hidden_weight=1.0),
        ),
        StudentSpec(
            "dp-eps8",
            "KD under DP-SGD: per-example clipping and Gaussian noise, ε=8 at δ=1e-5",
            DEFAULT_SHAPE,
            replace(_KD, **_DP, privacy=PrivacySettings(target_epsilon=8.0)),
        ),
        StudentSpec(
            "dp-eps2",
            "KD under DP-SGD: per-example clipping and Gaussian noise, ε=2 at δ=1e-5",
            DEFAULT_SHAPE,
            replace(_KD, **_DP, privacy=PrivacySettings(target_epsilon=2.0)),
        ),
    )
}
DEFAULT_STUDENT = "kd-attn"


def get_student(name: str) -> StudentSpec:
    try:
        return STUDENTS[name]
    except KeyError:
        known = ", ".join(STUDENTS)
        raise CompoundError(f"unknown student {name!r}; known students: {known}") from None


def student_key(teacher_dir: Path, spec: StudentSpec) -> str:
    recipe = {"teacher": teacher_dir.name, "shape": spec.shape.to_dict(), **spec.recipe.to_dict()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def student_path(teacher_dir: Path, spec: StudentSpec) -> Path:
    return (
        teacher_dir.parent
        / f"{teacher_dir.name}-student-{spec.name}-{student_key(teacher_dir, spec)}"
    )


def teacher_dir_of(bundle: ModelBundle, purpose: str = "distillation") -> Path:
    """The cached checkpoint a trained preset's bundle was loaded from, or one line saying
    why it has none (what is made from a teacher is cached beside it)."""
    if bundle.source == "preset" or bundle.metadata.get("external") or not bundle.trained:
        raise CompoundError(
            f"{purpose} needs a teacher trained by compound-bench (a trained preset from the "
            f"cache), not {bundle.source!r}"
        )
    if "student" in bundle.metadata:
        raise CompoundError(f"{bundle.source} is a student already; distill from its teacher")
    return Path(bundle.source)


def make_command(preset: str, spec: StudentSpec) -> str:
    return f"compound distill --preset {preset} --student {spec.name}"


def find_student(teacher: ModelBundle, spec: StudentSpec) -> Path:
    """The student's cached directory, or one line saying how to make it."""
    path = student_path(teacher_dir_of(teacher), spec)
    if not path.is_dir():
        raise CompoundError(
            f"no student {spec.name!r} of {teacher.preset} in {path.parent}; run "
            f"`{make_command(teacher.preset, spec)}` first (or `compound run --train-students`)"
        )
    return path


def train_student(
    teacher: ModelBundle, spec: StudentSpec, *, show_progress: bool = True
) -> ModelBundle:
    """Distil, score on the validation split, save beside the teacher; the saved student."""
    path = student_path(teacher_dir_of(teacher), spec)
    student = build_student(teacher, spec.shape)
    result = distill(teacher, student, spec.recipe, show_progress=show_progress)
    started = time.perf_counter()
    validation = evaluate(student, split="val", count=2000)
    info: dict[str, Any] = {
        "student": {
            **spec.to_dict(),
            "teacher": str(teacher.source),
            "teacher_params": teacher.param_count(),
            **student.metadata["student"],
        },
        "distill_seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "final_terms": result.losses,
        "privacy": None if result.privacy is None else vars(result.privacy),
        "val_accuracy": validation.accuracy,
        "val_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "params": student.param_count(),
    }
    save_checkpoint(student, path, info)
    return load_model_dir(path)


def ensure_student(
    teacher: ModelBundle, spec: StudentSpec, *, show_progress: bool = True, retrain: bool = False
) -> tuple[ModelBundle, bool]:
    """The student and whether it was trained just now (False: from the cache)."""
    path = student_path(teacher_dir_of(teacher), spec)
    will_train = retrain or not path.is_dir()
    check_cache_dir(path.parent.parent, writable=will_train)
    remove_stale_staging(path.parent, path.name)
    if not will_train:
        return load_student(path, device=teacher.device, dtype=teacher.dtype), False
    return train_student(teacher, spec, show_progress=show_progress), True


def load_student(path: Path, **kwargs: Any) -> ModelBundle:
    """A cached student; when it will not load, say how to rebuild it."""
    try:
        return load_model_dir(path, **kwargs)
    except CompoundError as error:
        raise CompoundError(
            f"{error}; `compound distill ... --force` with the same student rebuilds it"
        ) from None
