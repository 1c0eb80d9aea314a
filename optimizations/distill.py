"""Knowledge distillation (paper §2.1) as a transform: the teacher is swapped for its student.

The student is trained beforehand (`compound distill`, or `compound run --train-students`) and
cached beside the teacher; this transform only loads it onto the teacher's device and dtype and
puts it in the bundle's place, so the transforms stacked after it (sleep, pruning, fused QKV)
act on the student. It changes every module at once, so it must come first in a stack.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.students import (
    DEFAULT_STUDENT,
    STUDENTS,
    ensure_student,
    find_student,
    get_student,
    load_student,
)
from optimizations.base import Figure, Transform, register
from optimizations.params import Param

KEPT = Figure("distill_params_kept", "student parameters / teacher's", "fraction", "applied")


@register
class Distill(Transform):
    name = "distill"
    description = (
        "knowledge distillation (paper 2.1): serve the cached student (fewer decoder and "
        "vision layers) trained from this teacher"
    )
    targets = ("*",)  # every module changes
    lossless = False
    tolerance = None
    requires = frozenset({"materialized"})
    replaces_model = True
    figures = (KEPT,)
    params = (
        Param(
            "student",
            str,
            DEFAULT_STUDENT,
            "which named student (compound distill --student NAME made it)",
            choices=tuple(STUDENTS),
        ),
        Param(
            "path",
            str,
            None,
            "a student checkpoint directory to serve instead of a named one",
            nullable=True,
        ),
    )

    def cached_input(self, bundle: ModelBundle) -> Path:
        if self.values["path"]:
            path = Path(self.values["path"]).expanduser()
            if not path.is_dir():
                raise CompoundError(
                    f"transform {self.name}: student path is not a directory: {path}"
                )
            return path
        return find_student(bundle, get_student(self.values["student"]))

    def prepare(self, bundle: ModelBundle, *, show_progress: bool = True) -> None:
        """Train the named student if the cache lacks it (a given path is used as it is)."""
        if not self.values["path"]:
            ensure_student(bundle, get_student(self.values["student"]), show_progress=show_progress)

    def apply_in_place(self, bundle: ModelBundle) -> dict[str, float]:
        teacher_params = bundle.param_count()
        student = load_student(self.cached_input(bundle), device=bundle.device, dtype=bundle.dtype)
        bundle.model = student.model
        bundle.prompts = student.prompts
        bundle.source = student.source
        bundle.metadata["student"] = student.metadata.get("student", {"path": student.source})
        return {KEPT.metric: student.param_count() / teacher_params}
