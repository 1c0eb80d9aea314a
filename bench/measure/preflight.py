"""Before any timing: what can run here, whether lossless claims hold, and each configuration's
accuracy.

This runs once in the parent process on the loaded baseline, so no worker ever holds two copies
of the model (that would inflate its peak memory), and the results are stored before the first
timed block:

- a transform whose requirements are unmet here (CUDA, a torch version) is skipped with the
  reason, and the designs are built from the rest;
- every configuration's lossless transforms, applied alone, must reproduce the baseline's
  prefill logits (within the declared tolerance) and greedy tokens on the workload's requests;
  a mismatch rejects the configuration, and the run says so;
- every configuration that is not rejected is scored on the same held-out examples, per
  example, so accuracy losses can be compared pairwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.configuration import Configuration, TransformSpec, WorkloadSpec
from bench.designs import BASELINE, config_name
from bench.measure.workload import build_requests
from models.bundle import ModelBundle
from models.evaluate import EvalResult, evaluate
from optimizations.lossless import check_lossless
from optimizations.registry import apply_transforms, get_transform

OK, REJECTED = "ok", "rejected"


@dataclass
class Preflight:
    """What the checks found for one configuration."""

    config: str
    status: str  # "ok" or "rejected"
    reason: str = ""
    lossless_checked: list[str] = field(default_factory=list)
    max_abs_logit_diff: float | None = None
    lossless_detail: str = ""
    targets: list[str] = field(default_factory=list)  # module handles its transforms change
    accuracy: dict[str, float] = field(default_factory=dict)
    accuracy_by_kind: dict[str, float] = field(default_factory=dict)
    correct: list[bool] = field(default_factory=list)  # per example, same examples for all

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_fit(transforms: Sequence[TransformSpec], shape: ModelBundle) -> None:
    """CompoundError when a transform does not fit the model's structure (a layer it lacks).

    Works on a shape alone (a bundle on the meta device), so a bad parameter is refused
    before a teacher is trained or real-scale weights are built.
    """
    for spec in transforms:
        get_transform(spec.name, spec.params).validate_for(shape)


def unmet_requirements(
    transforms: Sequence[TransformSpec], bundle: ModelBundle, engine: str = "eager"
) -> dict[str, str]:
    """Transform name → why it cannot run here (CUDA, versions, the run's engine), for those
    that cannot.

    The others are checked against the model's structure at once, so a parameter that does
    not fit the model (a layer it lacks) fails before any result directory is made.
    """
    reasons = {}
    for spec in transforms:
        transform = get_transform(spec.name, spec.params)
        reason = transform.engine_problem(engine) or transform.check_requirements(bundle)
        if reason is None:
            transform.validate_for(bundle)
        else:
            reasons[spec.name] = reason
    return reasons


def _lossless_part(configuration: Configuration) -> tuple[TransformSpec, ...]:
    return tuple(
        spec for spec in configuration.transforms if get_transform(spec.name, spec.params).lossless
    )


def _scored(result: EvalResult, preflight: Preflight) -> Preflight:
    preflight.accuracy = result.accuracy
    preflight.accuracy_by_kind = result.by_kind
    preflight.correct = result.correct
    return preflight


def run_preflight(
    baseline: ModelBundle,
    configurations: Sequence[Configuration],
    workload: WorkloadSpec,
    eval_count: int,
    say: Callable[[str], None] = lambda _message: None,
) -> Iterator[Preflight]:
    """Check and score every configuration, yielding each as it is done (so the caller can
    store it at once and a killed run keeps it); the baseline bundle is left as it was.

    `eval_count` 0 skips scoring (cost-only models have random weights: nothing to score).
    """
    requests = build_requests(baseline, workload)
    checked: dict[str, tuple[bool, float, str]] = {}  # lossless subset → its check
    for configuration in configurations:
        name = configuration.name
        preflight = Preflight(name, OK)
        lossless = _lossless_part(configuration)
        if lossless:
            key = config_name([spec.name for spec in lossless])
            if key not in checked:
                say(f"lossless check: {key}")
                outcome = check_lossless(
                    baseline, apply_transforms(baseline, lossless), requests, workload.new_tokens
                )
                checked[key] = (outcome.ok, outcome.max_abs_diff, outcome.detail)
            ok, worst, detail = checked[key]
            preflight.lossless_checked = [spec.name for spec in lossless]
            preflight.max_abs_logit_diff, preflight.lossless_detail = worst, detail
            if not ok:
                preflight.status = REJECTED
                preflight.reason = f"lossless check failed for {key}: {detail}"
                yield preflight
                continue
        transformed = apply_transforms(baseline, configuration.transforms)
        applied = transformed.metadata.get("transforms", [])
        preflight.targets = sorted({t for entry in applied for t in entry["targets"]})
        if eval_count and (configuration.transforms or name == BASELINE):
            say(f"accuracy: {name}")
            preflight = _scored(evaluate(transformed, "test", eval_count), preflight)
        yield preflight
