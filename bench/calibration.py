"""What `compound calibrate` does: how small a change this machine resolves in a time budget.

Runs the baseline against an identical copy of itself and against copies slowed by known
amounts, interleaved like any suite, then judges the result (`bench.judge.mde`).
"""

from __future__ import annotations

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
from bench.judge.mde import COPY, REFERENCE, calibration_report, planted_name
from bench.measure.environment import collect_environment
from bench.measure.runner import run_rounds
from bench.store import RunStore, load_run
from core.errors import CompoundError
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
            report = calibration_report(samples, planted, budget, source.device)
            if keep:
                store.update_meta("calibration", report)
                report["run_id"] = store.run_id
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
    return report
