"""`compound distill`: train a student from a preset's cached teacher and cache it beside it."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from bench.commands.common import (
    HOURS,
    Bound,
    add_cache_arg,
    add_json_arg,
    add_no_limits_arg,
    check_bounds,
    finite_float,
    positive_int,
    print_json,
)
from core.errors import CompoundError
from models.bundle import ModelBundle
from models.checkpoint import cache_dir, check_cache_dir
from models.distill import PrivacySettings, StudentSpec
from models.evaluate import evaluate
from models.presets import DEFAULT_PRESET, PRESETS, get_preset, llava_config
from models.students import DEFAULT_STUDENT, STUDENTS, ensure_student, get_student
from models.teacher import ensure_trained

# Flags that change the named student's shape or recipe; any of them makes a custom student.
SHAPE_FLAGS = {
    "student_layers": "decoder_layers",
    "student_vision_layers": "vision_layers",
    "student_hidden": "text_hidden",
    "student_intermediate": "text_intermediate",
}
RECIPE_FLAGS = {
    "steps": "steps",
    "temperature": "temperature",
    "alpha": "alpha",
    "attention_weight": "attention_weight",
    "hidden_weight": "hidden_weight",
}
PRIVACY_FLAGS = {"epsilon": "target_epsilon", "delta": "delta", "clip_norm": "clip_norm"}
BOUNDS = {
    "student_layers": Bound(low=1),
    "student_vision_layers": Bound(low=1),
    "student_hidden": Bound(low=1, high=65_536),
    "student_intermediate": Bound(low=1, high=262_144),
    "steps": Bound(low=1, cap=20_000, why=HOURS),
    "temperature": Bound(low=0, low_open=True, high=100),
    "alpha": Bound(low=0, high=1),
    "attention_weight": Bound(low=0, high=1_000),
    "hidden_weight": Bound(low=0, high=1_000),
    "epsilon": Bound(low=0, low_open=True, high=1_000),
    "delta": Bound(low=0, low_open=True, high=0.01, why="δ should be well below 1/N"),
    "clip_norm": Bound(low=0, low_open=True, high=1_000),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill", help="train a smaller student from a preset's teacher (paper 2.1)"
    )
    trainable = ", ".join(n for n, p in PRESETS.items() if not p.cost_only)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"the teacher ({trainable})")
    parser.add_argument(
        "--student",
        default=DEFAULT_STUDENT,
        help=f"a named student: {', '.join(STUDENTS)} (default {DEFAULT_STUDENT}); "
        "`compound distill --list` describes them",
    )
    parser.add_argument("--list", action="store_true", help="describe the named students")
    shape = parser.add_argument_group("shape (any of these makes a custom student)")
    shape.add_argument("--student-layers", type=positive_int, help="decoder layers")
    shape.add_argument("--student-vision-layers", type=positive_int, help="vision layers")
    shape.add_argument("--student-hidden", type=positive_int, help="decoder width")
    shape.add_argument("--student-intermediate", type=positive_int, help="decoder MLP width")
    recipe = parser.add_argument_group("recipe (any of these makes a custom student)")
    recipe.add_argument("--steps", type=positive_int, help="optimizer steps")
    recipe.add_argument("--temperature", type=finite_float, help="soft-target temperature T")
    recipe.add_argument(
        "--alpha", type=finite_float, help="weight of the soft targets (hard labels: 1 − α)"
    )
    recipe.add_argument(
        "--attention-weight", type=finite_float, help="weight of attention-map alignment"
    )
    recipe.add_argument(
        "--hidden-weight", type=finite_float, help="weight of hidden-state alignment"
    )
    recipe.add_argument(
        "--epsilon", type=finite_float, help="train under DP-SGD to this ε (δ from --delta)"
    )
    recipe.add_argument("--delta", type=finite_float, help="DP δ (default 1e-5)")
    recipe.add_argument("--clip-norm", type=finite_float, help="DP per-example clip norm C")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    add_cache_arg(parser)
    add_no_limits_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def custom_spec(
    args: argparse.Namespace, base: StudentSpec, teacher_layers: dict[str, int]
) -> StudentSpec:
    """The named student with the flags' changes; named `custom` when anything changed."""
    shape_changes = {
        field: getattr(args, flag)
        for flag, field in SHAPE_FLAGS.items()
        if getattr(args, flag) is not None
    }
    recipe_changes = {
        field: getattr(args, flag)
        for flag, field in RECIPE_FLAGS.items()
        if getattr(args, flag) is not None
    }
    privacy_changes = {
        field: getattr(args, flag)
        for flag, field in PRIVACY_FLAGS.items()
        if getattr(args, flag) is not None
    }
    privacy = base.recipe.privacy
    if privacy_changes:
        if privacy is None and "target_epsilon" not in privacy_changes:
            raise CompoundError(f"--delta and --clip-norm need --epsilon for student {base.name}")
        privacy = (
            replace(privacy, **privacy_changes) if privacy else PrivacySettings(**privacy_changes)
        )
        recipe_changes["privacy"] = privacy
    if not (shape_changes or recipe_changes):
        return base
    spec = StudentSpec(
        "custom",
        f"{base.name} with {', '.join(sorted({**shape_changes, **recipe_changes}))} changed",
        replace(base.shape, **shape_changes),
        replace(base.recipe, **recipe_changes),
    )
    for field, most in teacher_layers.items():
        value = getattr(spec.shape, field)
        if value > most:
            flag = "--" + next(f for f, v in SHAPE_FLAGS.items() if v == field).replace("_", "-")
            raise CompoundError(f"{flag} must be at most the teacher's {most}, got {value}")
    return spec


def _check_width(spec: StudentSpec, heads: int) -> None:
    hidden = spec.shape.text_hidden
    if hidden is not None and hidden % heads:
        raise CompoundError(
            f"--student-hidden must be a multiple of the decoder's {heads} attention heads, "
            f"got {hidden}"
        )


def run(args: argparse.Namespace) -> int:
    if args.list:
        described = [spec.to_dict() for spec in STUDENTS.values()]
        if args.json:
            print_json(described)
        else:
            for spec in STUDENTS.values():
                mark = " (default)" if spec.name == DEFAULT_STUDENT else ""
                shape, recipe = spec.shape, spec.recipe
                print(
                    f"{spec.name}{mark}: {spec.description}; {shape.decoder_layers} decoder and "
                    f"{shape.vision_layers} vision layer(s), {recipe.steps} steps of "
                    f"{recipe.batch_size}"
                )
        return 0
    check_bounds(args, BOUNDS)
    preset = get_preset(args.preset)
    if preset.cost_only:
        raise CompoundError(
            f"preset {preset.name!r} is cost-only (random weights): it has no teacher to distil"
        )
    config = llava_config(preset)
    layers = {
        "decoder_layers": config.text_config.num_hidden_layers,
        "vision_layers": config.vision_config.num_hidden_layers,
    }
    spec = custom_spec(args, get_student(args.student), layers)
    _check_width(spec, config.text_config.num_attention_heads)
    cache = cache_dir(args.cache_dir)
    check_cache_dir(cache, writable=True)
    teacher, _ = ensure_trained(preset.name, cache, show_progress=not args.json)
    student, trained_now = ensure_student(
        teacher, spec, show_progress=not args.json, retrain=args.force
    )
    report = _report(preset.name, spec, teacher, student, trained_now)
    report["path"] = student.source
    if args.json:
        print_json(report)
    else:
        _print(report)
    return 0


def _report(
    preset: str,
    spec: StudentSpec,
    teacher: ModelBundle,
    student: ModelBundle,
    trained_now: bool,
) -> dict[str, Any]:
    teacher_val = teacher.metadata.get("val_accuracy") or evaluate(teacher, "val", 2000).accuracy
    student_val = student.metadata.get("val_accuracy") or evaluate(student, "val", 2000).accuracy
    return {
        "preset": preset,
        "student": spec.name,
        "trained_now": trained_now,
        "params": student.param_count(),
        "teacher_params": teacher.param_count(),
        "params_ratio": student.param_count() / teacher.param_count(),
        "val_accuracy": student_val,
        "teacher_val_accuracy": teacher_val,
        "distill_seconds": student.metadata.get("distill_seconds"),
        "torch_threads": student.metadata.get("torch_threads"),
        "privacy": student.metadata.get("privacy"),
        "shape": spec.shape.to_dict(),
        "recipe": spec.recipe.to_dict(),
    }


def _print(report: dict[str, Any]) -> None:
    verb = "distilled" if report["trained_now"] else "already cached"
    print(f"{report['preset']} student {report['student']}: {verb} at {report['path']}")
    print(
        f"  {report['params']:,} parameters ({report['params_ratio']:.0%} of the teacher's), "
        f"trained in {report['distill_seconds']} s on {report['torch_threads']} threads"
    )
    student, teacher = report["val_accuracy"], report["teacher_val_accuracy"]
    accuracy = ", ".join(
        f"{kind} {student[kind]:.1%} (teacher {teacher[kind]:.1%})" for kind in ("image", "text")
    )
    print(f"  validation accuracy: {accuracy}")
    privacy = report["privacy"]
    if privacy:
        print(
            f"  privacy: ε={privacy['epsilon']:.2f} at δ={privacy['delta']:g} (noise multiplier "
            f"{privacy['noise_multiplier']:.3f}, sampling rate {privacy['sample_rate']:.4f}, "
            f"{privacy['steps']} steps; {privacy['accountant']})"
        )
    if report["student"] == "custom":
        print(f"  serve it with: --transforms distill --param distill.path={report['path']}")
