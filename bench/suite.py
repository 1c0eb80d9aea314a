"""The suite: what `compound run` does, as an API the command (or a script) calls.

plan → start (or resume) → measure (checks, then interleaved rounds) → analyse.

- `start` trains the teacher if the cache lacks it, leaves out transforms this machine cannot
  run (saying why), and creates the run directory only once everything was checked.
- `measure` checks and scores every configuration not yet checked, then runs the rounds; each
  finished block is stored at once, so a killed run resumes with nothing lost or repeated.
- `analyse` recomputes every table and the verdict from the stored records and writes them
  beside them: summary.csv, module_shares.csv, comparisons.csv, verdict.json, report.md.
"""

from __future__ import annotations

import gc
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.configuration import (
    ModelSource,
    Protocol,
    RunSpec,
    ServingSpec,
    TransformSpec,
    WorkloadSpec,
)
from bench.designs import BASELINE, build_configurations
from bench.judge import analysis, stopping
from bench.judge.analysis import RunTables
from bench.judge.busy import busy_summary
from bench.judge.shares import module_shares
from bench.judge.suite_verdict import judge
from bench.measure.environment import collect_environment
from bench.measure.loading import load_bundle, resolve_device
from bench.measure.memory_plan import check_fits, estimate_worker, free_bytes, workers_that_fit
from bench.measure.preflight import REJECTED, check_fit, run_preflight, unmet_requirements
from bench.measure.runner import RunOutcome, run_rounds
from bench.measure.trackers.energy import measure_idle_power, select_energy_meter
from bench.measure.workload import build_requests, cache_length
from bench.report.html import html_report
from bench.report.markdown import markdown_report
from bench.report.pictures import pictures
from bench.store import RUN_JSON, RunStore, load_run
from core.errors import CompoundError, RunInterrupted
from core.jsonio import json_text
from models.bundle import ModelBundle
from models.checkpoint import build_bundle, cache_dir, check_cache_dir, checkpoint_path
from models.presets import DEFAULT_PRESET, get_preset
from models.teacher import ensure_trained
from optimizations.registry import get_transform

DEFAULT_TRANSFORMS = ("vision_sleep", "token_pruning", "fused_qkv")
# Named transform lists (`compound run --suite NAME`). `systems` holds the serving-systems
# techniques (routing, the vision cache, mapped weights), kept out of the default suite so it
# stays within its time budget (six transforms make 15 configurations instead of 9).
SUITES = {
    "default": DEFAULT_TRANSFORMS,
    "systems": ("mmap_load", "modality_routing", "vision_cache"),
}
DEFAULT_DESIGNS = ("singles", "leave-one-out")
DEFAULT_PROCESSES = 12

Say = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


def model_source(
    preset: str | None,
    model_path: Path | None,
    cache: str | Path | None,
    device: str,
    *,
    trained: bool = False,
) -> ModelSource:
    """Where a run's model comes from: a checkpoint directory, or a preset (checked by name)."""
    if trained and model_path is None:
        raise CompoundError("--trained describes a --model directory; presets know themselves")
    common = {"cache_dir": str(cache_dir(cache)), "device": resolve_device(device)}
    if model_path is not None:
        path = Path(model_path).expanduser().resolve()
        if not path.is_dir():
            raise CompoundError(f"model path is not a directory: {path}")
        return ModelSource(model_path=str(path), trained=trained, **common)
    name = DEFAULT_PRESET if preset is None else preset
    return ModelSource(preset=get_preset(name).name, **common)


def plan(
    source: ModelSource,
    transforms: tuple[TransformSpec, ...],
    designs: tuple[str, ...],
    workload: WorkloadSpec,
    protocol: Protocol,
    *,
    aa_control: bool = True,
    serving: ServingSpec | None = None,
) -> RunSpec:
    """The suite's configurations: the designs over the transforms, plus the A/A control."""
    configurations = build_configurations(transforms, designs, aa_control)
    return RunSpec(
        source,
        configurations,
        workload,
        protocol,
        transforms,
        designs,
        aa_control,
        serving or ServingSpec(),
    )


@dataclass
class Suite:
    """A run being measured: its store, its (stored) plan, and the baseline for the checks."""

    store: RunStore
    spec: RunSpec
    baseline: ModelBundle | None = None
    repaired: dict[str, Any] | None = None  # what `--repair` dropped from samples.jsonl


def drop_unrunnable(spec: RunSpec, bundle: ModelBundle) -> tuple[RunSpec, dict[str, str]]:
    """Leave out transforms whose requirements this machine cannot meet, saying why."""
    skipped = unmet_requirements(spec.transforms, bundle, spec.serving.engine)
    if not skipped:
        return spec, {}
    kept = tuple(t for t in spec.transforms if t.name not in skipped)
    configurations = build_configurations(kept, spec.designs, spec.aa_control)
    return replace(spec, transforms=kept, configurations=configurations), skipped


def prepare_model(spec: RunSpec, show_progress: bool) -> tuple[dict[str, Any], ModelBundle]:
    """Train the teacher if the cache lacks it; the loaded baseline and what describes it."""
    source = spec.source
    trained_now = False
    if source.preset and not get_preset(source.preset).cost_only:
        _, trained_now = ensure_trained(
            source.preset, Path(str(source.cache_dir)), show_progress=show_progress
        )
    bundle = load_bundle(source)
    return {"model": bundle.describe(), "trained_now": trained_now}, bundle


def memory_plan(spec: RunSpec, bundle: ModelBundle) -> tuple[RunSpec, dict[str, Any]]:
    """Estimate one worker's memory and check the workers alive at once fit what is free
    (counting the parent's checked copy as free: it is released before any worker starts).

    When one worker per configuration does not fit and `--max-alive` was left to the plan,
    the plan lowers it to as many as fit (the runner then runs an epoch in groups); when a
    set `--max-alive`, or a single worker, does not fit, one line says what to change.
    """
    device = torch.device(spec.source.device)
    requests = build_requests(bundle, spec.workload)
    estimate = estimate_worker(
        bundle.model,
        bundle.dtype,
        max(spec.serving.batch_sizes),
        cache_length(requests, spec.workload.new_tokens),
        device.type,
    )
    free = free_bytes(device)
    if device.type == "cuda":
        free += torch.cuda.memory_allocated(device)
    configurations = len(spec.configurations)
    asked = spec.protocol.max_alive
    alive = min(asked, configurations) if asked else configurations
    if not asked and alive > 1 and workers_that_fit(estimate, free) < alive:
        alive = max(workers_that_fit(estimate, free), 1)
        spec = replace(spec, protocol=replace(spec.protocol, max_alive=alive))
    check_fits(estimate, alive, free, device=device.type)
    plan = {**estimate.describe(), "workers_alive_at_once": alive, "free_bytes": free}
    plan["lowered_from"] = configurations if alive < configurations and not asked else None
    return spec, plan


def declared_figures(transforms: tuple[TransformSpec, ...]) -> dict[str, dict[str, str]]:
    """metric → what the transform that reports it declared (label, unit, kind, module)."""
    figures = {}
    for spec in transforms:
        for figure in get_transform(spec.name, spec.params).figures:
            figures[figure.metric] = {**figure.describe(), "transform": spec.name}
    return figures


def start(
    spec: RunSpec,
    results_dir: Path,
    run_id: str | None = None,
    *,
    show_progress: bool = True,
    say: Say = _quiet,
    prepare_transforms: bool = False,
) -> Suite:
    """A new run: the teacher ready, unrunnable transforms left out, the directory created.

    A preset's transforms are checked against its shape first, before any training.
    `prepare_transforms` builds what a transform needs from the teacher and the cache lacks
    (distillation's student); otherwise its check says how to make it.
    """
    if spec.source.preset:
        check_fit(spec.transforms, build_bundle(spec.source.preset, materialize=False))
    info, bundle = prepare_model(spec, show_progress)
    if prepare_transforms:
        for transform_spec in spec.transforms:
            get_transform(transform_spec.name, transform_spec.params).prepare(
                bundle, show_progress=show_progress
            )
    spec, skipped = drop_unrunnable(spec, bundle)
    for name, reason in skipped.items():
        say(f"skipping transform {name}: {reason}")
    spec, plan = memory_plan(spec, bundle)
    if plan["lowered_from"]:
        say(
            f"memory: {plan['workers_alive_at_once']} of {plan['lowered_from']} workers fit at "
            "once; each process round runs its configurations in groups of that many"
        )
    store = RunStore.create(
        results_dir,
        spec.to_dict(),
        collect_environment(torch.device(spec.source.device), spec.protocol.seed),
        run_id,
    )
    store.update_meta("skipped_transforms", skipped)
    store.update_meta("memory_plan", plan)
    store.update_meta("transform_figures", declared_figures(spec.transforms))
    for key, value in info.items():
        store.update_meta(key, value)
    return Suite(store, spec, bundle)


def resume(
    results_dir: Path, run_id: str, *, show_progress: bool = True, repair: bool = False
) -> Suite:
    """A stored run, to continue where it stopped; its stored plan is reused as it was.

    The run is locked for this process; `repair` first drops damaged lines of samples.jsonl
    (a backup is kept), so the blocks they belonged to are measured again.
    """
    stored = RunStore.open(results_dir, run_id)  # read-only: a broken run is refused untouched
    spec = RunSpec.from_dict(stored.config, str(stored.path / RUN_JSON))
    check_available(spec.source)
    store = RunStore.open(results_dir, run_id, writer=True)
    suite = Suite(store, spec, repaired=store.repair() if repair else None)
    if "model" not in store.meta:  # killed before the model was described
        info, suite.baseline = prepare_model(spec, show_progress)
        for key, value in info.items():
            store.update_meta(key, value)
    return suite


def check_available(source: ModelSource) -> None:
    """A stored run's model must still be where it was: say so before anything changes."""
    if source.model_path is not None:
        if not Path(source.model_path).is_dir():
            raise CompoundError(f"the run's model directory is gone: {source.model_path}")
        return
    preset = get_preset(str(source.preset))
    if preset.cost_only:
        return
    cache = Path(str(source.cache_dir))
    check_cache_dir(cache, writable=False)
    if not checkpoint_path(preset, cache).exists():
        raise CompoundError(
            f"no trained checkpoint for preset {preset.name!r} in {cache}, where this run's "
            f"model was; run `compound train --preset {preset.name} --cache-dir {cache}` first"
        )


def check(suite: Suite, say: Say = _quiet) -> None:
    """Check and score the configurations not yet checked (all of them, unless resuming)."""
    store, spec = suite.store, suite.spec
    done = {record["config"] for record in store.extras("preflight")}
    todo = [c for c in spec.configurations if c.name not in done]
    if not todo:
        return
    bundle = suite.baseline or load_bundle(spec.source)
    count = spec.protocol.eval_examples if bundle.trained else 0  # random weights: no score
    for result in run_preflight(bundle, todo, spec.workload, count, say):
        store.record_extra("preflight", result.to_dict())
        if result.status == REJECTED:
            store.record_failure(result.config, f"rejected: {result.reason}")
        if result.config == BASELINE and result.accuracy:
            store.update_meta("accuracy", result.accuracy)
            store.update_meta("accuracy_by_kind", result.accuracy_by_kind)


def release_baseline(suite: Suite) -> None:
    """Drop the parent's checked copy before the workers load theirs: on a GPU its memory
    would otherwise sit beside every worker's."""
    suite.baseline = None
    gc.collect()
    if torch.device(suite.spec.source.device).type == "cuda":
        torch.cuda.empty_cache()


def idle_power(spec: RunSpec) -> dict[str, Any] | None:
    """The device's idle power from the run's own energy meter (None when it only estimates)."""
    device = torch.device(spec.source.device)
    return measure_idle_power(select_energy_meter(device, spec.protocol.watts_per_core))


@contextmanager
def remembered_interrupt() -> Iterator[Callable[[], bool]]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered, so the runner stops at
    its next round even if the exception was swallowed: one raised while a finalizer
    (`__del__`) runs is only printed as "Exception ignored". (A CI run once finished with exit
    code 0 after its Ctrl-C; this is the way that could happen that we know of.) Outside the
    main thread no handler can be set: nothing is remembered there."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def on_interrupt(signum: int, frame: object) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)


AUTO, ISOLATED = "auto", "isolated"
# Transforms whose compiled kernels live in the process (torch.compile keeps one cache per
# process), and engines that compile: configurations sharing a process would share it.
COMPILED_REQUIREMENT = "flex_attention"
COMPILING_ENGINES = ("graphs",)


def resolve_placement(
    choice: str, transforms: tuple[TransformSpec, ...], engine: str
) -> tuple[str, str]:
    """The placement `--placement auto` means for these transforms, and why: co-resident
    (it halves the interaction interval per minute here; README) unless something compiles,
    since compiled graphs of several configurations in one process would share one compile
    cache and recompile one another."""
    if choice != AUTO:
        return choice, "chosen"
    if engine in COMPILING_ENGINES:
        return ISOLATED, f"the {engine} engine compiles: each configuration in its own process"
    compiled = [
        t.name
        for t in transforms
        if COMPILED_REQUIREMENT in get_transform(t.name, t.params).requires
    ]
    if compiled:
        return ISOLATED, f"{', '.join(compiled)} compile: each configuration in its own process"
    return "coresident", "auto: nothing compiles, so configurations share their processes"


def stopping_rule(suite: Suite, say: Say) -> Callable[[int], str | None] | None:
    """The sequential rule for `run_rounds` (None when the run does not look): after each
    planned look, the latency residual at the look's confidence; stop when it is decisive.
    Every look is stored in the run's meta, so the report says what was seen and when."""
    spec, store = suite.spec, suite.store
    planned = spec.protocol.processes
    if not spec.protocol.sequential or not stopping.sequential_applies(planned):
        return None
    singles = [t.name for t in spec.transforms]
    looks: dict[str, Any] = dict(store.meta.get("sequential", {}).get("looks", {}))

    def decided(processes: int) -> str | None:
        if processes not in stopping.planned_looks(planned) or len(singles) < 2:
            return None
        samples = analysis.at_batch(load_run(store.path).samples, spec.serving.batch_sizes[0])
        look = stopping.latency_look(samples, singles, processes, planned, spec.protocol.margin)
        if look is None:
            return None
        looks[str(processes)] = look.to_dict()
        point, lo, hi = look.residual
        say(
            f"look after {processes}/{planned} processes: latency residual {point:+.2%} "
            f"[{lo:+.2%}, {hi:+.2%}] at {look.confidence:.1%}: {look.outcome}"
        )
        reason = None
        if stopping.decisive(look):
            reason = f"the latency residual is decisive ({look.outcome} the ±margin)"
        store.update_meta(
            "sequential",
            {"planned": planned, "looks": looks, "decided_after": processes if reason else None},
        )
        return reason

    return decided


def measure(suite: Suite, say: Say = _quiet) -> RunOutcome:
    """The checks, then the interleaved rounds; Ctrl-C leaves a run that `resume` continues."""
    store = suite.store
    store.set_state("running")
    try:
        with remembered_interrupt() as interrupted:

            def progress(message: str) -> None:
                if interrupted():  # a Ctrl-C whose KeyboardInterrupt something swallowed
                    raise KeyboardInterrupt
                say(f"measuring: {message}")

            check(suite, say)
            release_baseline(suite)
            if "idle_power" not in store.meta:  # once per run, before any worker starts
                say("measuring the device's idle power")
                store.update_meta("idle_power", idle_power(suite.spec))
            outcome = run_rounds(
                suite.spec, store, progress=progress, decided=stopping_rule(suite, say)
            )
    except KeyboardInterrupt:
        store.set_state("interrupted")
        raise RunInterrupted(
            f"interrupted; continue with `compound run --resume {store.run_id}`"
        ) from None
    except CompoundError:
        store.set_state("interrupted")
        raise
    except Exception as error:  # a library's error: one line here, the traceback in the run
        store.log_error(f"{type(error).__name__} while measuring", traceback.format_exc())
        store.set_state("interrupted")
        first = (str(error).strip().splitlines() or [""])[0]
        raise CompoundError(
            f"the run stopped on {type(error).__name__}: {first} (details in "
            f"{store.errors_path}); continue with `compound run --resume {store.run_id}`"
        ) from None
    store.update_meta("rounds", outcome.rounds)
    store.update_meta("stopped_by_budget", outcome.stopped_by_budget)
    store.update_meta("stopped_when_decided", outcome.decided)
    return outcome


def sequential_summary(meta: dict[str, Any], spec: RunSpec, processes: int) -> dict[str, Any]:
    """What the stopping rule did, and the confidence the final residual is stated at."""
    planned = spec.protocol.processes
    seen = meta.get("sequential") or {}
    decided_after = seen.get("decided_after")
    applies = spec.protocol.sequential and stopping.sequential_applies(planned)
    return {
        "enabled": bool(applies),
        "planned_processes": planned,
        "look_points": stopping.planned_looks(planned) if applies else [],
        "looks": list((seen.get("looks") or {}).values()),
        "decided_after": decided_after,
        "processes_measured": processes,
        "confidence": stopping.residual_confidence(planned, processes, decided_after)
        if applies
        else stopping.CONFIDENCE,
    }


def analyse(store: RunStore, spec: RunSpec) -> RunTables:
    """Recompute every table and the verdict from the stored records; write them beside them.

    Tables and the verdict read the primary batch size; a sweep adds batches.csv and one
    verdict per further batch size (verdict.json's `by_batch_size`).
    """
    loaded = load_run(store.path)
    sizes = list(spec.serving.batch_sizes)
    samples = analysis.at_batch(loaded.samples, sizes[0])
    summary = analysis.summary_table(samples)
    checks = {r["config"]: r for r in loaded.extras if r["kind"] == "preflight"}
    names = [t.name for t in spec.transforms]
    processes = analysis.rounds_of(samples, "latency_mean_s").n_epochs
    sequential = sequential_summary(loaded.meta, spec, processes)
    verdict = judge(samples, names, checks, spec.protocol, sequential["confidence"]).to_dict()
    verdict["sequential"] = sequential
    verdict["batch_size"] = sizes[0]
    if len(sizes) > 1:
        verdict["by_batch_size"] = {
            str(size): judge(
                analysis.at_batch(loaded.samples, size),
                names,
                checks,
                spec.protocol,
                sequential["confidence"],
            ).to_dict()
            for size in sizes[1:]
        }
    tables = RunTables(
        summary=summary,
        shares=module_shares(samples),
        comparisons=analysis.comparisons(samples, BASELINE),
        flags=analysis.flags(samples, summary),
        failures=loaded.failures,
        verdict=verdict,
        busy=busy_summary(samples),
        batches=analysis.batch_table(loaded.samples, sizes),
    )
    store.write_summary(summary)
    store.write_text("module_shares.csv", tables.shares.to_csv(index=False))
    store.write_text("comparisons.csv", tables.comparisons.to_csv(index=False))
    store.write_text("batches.csv", tables.batches.to_csv(index=False))
    store.write_text("verdict.json", json_text(tables.verdict))
    store.write_text("report.md", markdown_report(store.meta, tables))
    images = pictures(tables, samples, checks)
    for name, png in images.items():
        store.write_bytes(name, png)
    store.write_text("report.html", html_report(store.meta, tables, images))
    store.set_state("complete")
    return tables


def json_report(store: RunStore, tables: RunTables) -> dict[str, Any]:
    """The run as one JSON object, for `compound run --json`."""
    meta = store.meta
    return {
        "run_id": store.run_id,
        "path": str(store.path),
        "model": meta.get("model"),
        "accuracy": meta.get("accuracy"),
        "rounds": meta.get("rounds"),
        "placement": meta.get("placement"),
        "target_plan": meta.get("target_plan"),
        "stopped_when_decided": meta.get("stopped_when_decided"),
        "summary": tables.summary.to_dict(orient="records"),
        "module_shares": tables.shares.to_dict(orient="records"),
        "comparisons": tables.comparisons.to_dict(orient="records"),
        "verdict": tables.verdict,
        "flags": tables.flags,
        "busy": tables.busy,
        "batches": tables.batches.to_dict(orient="records"),
        "failures": tables.failures.to_dict(orient="records"),
    }
