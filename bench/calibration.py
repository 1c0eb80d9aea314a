"""What `compound calibrate` does: how small a change this machine resolves in a time budget.

Runs the baseline against an identical copy of itself and against copies slowed by known
amounts, interleaved like any suite, then judges the result (`bench.judge.mde`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.configuration import (
    Configuration,
    ModelSource,
    Protocol,
    RunSpec,
    ServingSpec,
    WorkloadSpec,
)
from bench.judge.components import Components
from bench.judge.mde import COPY, REFERENCE, SIMULATIONS, calibration_report, planted_name
from bench.measure.environment import collect_environment, cpu_model
from bench.measure.runner import run_rounds
from bench.store import RunStore, load_run
from core.errors import CompoundError
from core.jsonio import json_text
from models.presets import get_preset
from models.teacher import ensure_trained

DEFAULT_PLANTED = (0.01, 0.02, 0.05)
DEFAULT_PROCESSES = 12


def calibration_spec(
    source: ModelSource,
    planted: tuple[float, ...],
    budget: float,
    requests: int,
    threads: int,
    processes: int = DEFAULT_PROCESSES,
    start_method: str = "forkserver",
    serving: ServingSpec | None = None,
    placement: str = "coresident",
) -> RunSpec:
    """A/A and planted copies of the baseline, each in `processes` worker processes, until
    `budget` timed seconds are spent in all (worker start-ups come on top); served as a run
    would be (engine, batch sizes), with blocks of at least 1 s on CUDA as in a run."""
    if any(not 0 < p < 1 for p in planted):
        raise CompoundError("--planted slowdowns must be fractions in (0, 1), e.g. 0.02")
    copies = [Configuration(planted_name(p), slowdown=p) for p in planted]
    configurations = (Configuration(REFERENCE), Configuration(COPY), *copies)
    return RunSpec(
        source=source,
        configurations=configurations,
        workload=WorkloadSpec(requests_per_block=requests),
        protocol=Protocol(
            min_rounds=2 * processes,
            min_seconds=budget / len(configurations),
            processes=processes,
            start_method=start_method,
            placement=placement,
            memory_processes=0,  # calibration judges time only
            threads=threads,
            module_pass_every=0,
            min_block_seconds=1.0 if source.device.startswith("cuda") else 0.0,
        ),
        serving=serving or ServingSpec(),
    )


def calibrate(
    spec: RunSpec,
    planted: tuple[float, ...],
    results_dir: Path | None = None,
    *,
    show_progress: bool = True,
    say: Callable[[str], None] = lambda _message: None,
    simulations: int = SIMULATIONS,
) -> dict[str, Any]:
    """Run the calibration and judge it; the run is kept only when `results_dir` is given."""
    source = spec.source
    if source.preset and not get_preset(source.preset).cost_only:
        ensure_trained(source.preset, Path(str(source.cache_dir)), show_progress=show_progress)
    keep = results_dir is not None
    directory = results_dir or Path(tempfile.mkdtemp(prefix="compound-calibrate-"))
    environment = collect_environment(torch.device(source.device))
    try:
        with RunStore.create(directory, spec.to_dict(), environment) as store:
            run_rounds(spec, store, progress=lambda m: say(f"calibrating: {m}"))
            store.set_state("complete")
            budget = float(spec.protocol.min_seconds * len(spec.configurations))
            samples = load_run(store.path).samples
            report = calibration_report(samples, planted, budget, source.device, simulations)
            if keep:
                store.update_meta("calibration", report)
                report["run_id"] = store.run_id
            try:
                report["stored_as"] = str(save_calibration(report, spec))
            except OSError as error:  # a read-only cache: the report still stands
                report["stored_as"] = None
                say(f"calibration not kept for --target: {error}")
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
    return report


def machine() -> str:
    """What a calibration holds for: this CPU model, its core count, and the device."""
    return f"{cpu_model() or platform.processor() or 'unknown CPU'} × {os.cpu_count()} cores"


def calibration_path(source: ModelSource) -> Path:
    """Where the latest calibration for this model and device is kept: in the cache, beside
    the checkpoints (`compound run --target` plans from it)."""
    model = source.preset or Path(str(source.model_path)).name
    device = str(source.device).replace(":", "")
    return Path(str(source.cache_dir)) / "calibrations" / f"{model}-{device}.json"


def save_calibration(report: dict[str, Any], spec: RunSpec) -> Path:
    """Keep `report` as this machine's latest calibration for the spec's model and device."""
    path = calibration_path(spec.source)
    stored = {
        **report,
        "machine": machine(),
        "requests_per_block": spec.workload.requests_per_block,
        "configurations": len(spec.configurations),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".json.tmp")
    staged.write_text(json_text(stored))
    staged.replace(path)
    return path


def load_calibration(source: ModelSource) -> dict[str, Any]:
    """This machine's latest calibration for the source's model and device, or one line that
    says how to make it."""
    path = calibration_path(source)
    how = "run `compound calibrate` with the same model and device first"
    if not path.exists():
        raise CompoundError(f"--target needs a calibration of this machine: none in {path}; {how}")
    try:
        stored = json.loads(path.read_text())
        Components(**stored["components"])
        needed = (stored["machine"], stored["worker_start_s"], stored["block_s"])
        stored["requests_per_block"] = int(stored["requests_per_block"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CompoundError(
            f"the stored calibration {path} cannot be read ({error}); {how}"
        ) from None
    if needed[0] != machine():
        raise CompoundError(
            f"the stored calibration {path} was made on {needed[0]}, not this {machine()}; {how}"
        )
    return stored
