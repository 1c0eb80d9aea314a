"""Cold start as a measured phase: process start → weights loaded → first token, per
configuration, each time in a fresh process with the weights' pages evicted from the page cache.

A configuration loads its weights as its transforms ask (`Transform.load_options`), applies
them, and serves one image request to its first token. The baseline loads as compound always
does: transformers maps the safetensors file, then every tensor is copied into the process's
own memory, so each page of the file is read once and copied. With `mmap_load`, a page-aligned
copy of the weights is mapped and kept: pages are read when first touched, never copied.

Before each process the weights' pages are evicted: `weights` (default) flushes and evicts
both weight files with posix_fadvise(DONTNEED), which any user may do to their own files;
`all` drops the whole page cache through /proc/sys/vm/drop_caches (root only; libraries then
load cold too; where it is refused, the weights are evicted instead, and the record says so);
`none` keeps them (a warm start). Processes run one at a time, the configurations in a
shuffled order per repeat, so drift falls on all; the interval is a bootstrap over repeats of
the per-repeat ratio, and every repeat is a fresh process, so process-to-process spread is
inside it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.configuration import Configuration
from bench.designs import BASELINE
from bench.measure.interleaved import median_ratio
from core.errors import CompoundError
from models.checkpoint import (
    aligned_copy,
    build_bundle,
    checkpoint_key,
    checkpoint_path,
    save_checkpoint,
)
from models.presets import get_preset
from optimizations.registry import get_transform

EVICTIONS = ("weights", "all", "none")
PHASES = ("spawn_s", "import_s", "load_s", "first_token_s", "total_s")
_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ColdStart:
    """One fresh process: seconds per phase, its page faults and peak memory."""

    config: str
    repeat: int
    spawn_s: float  # spawn → the child's first statement (interpreter start)
    import_s: float  # → torch, transformers and compound imported
    load_s: float  # → weights loaded (config and tokenizer included)
    first_token_s: float  # → one image request's first token
    total_s: float  # spawn → first token
    major_faults: int
    minor_faults: int
    block_reads: int
    peak_rss_mib: float
    eviction: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoint_for(preset_name: str, cache: Path, dtype: Any) -> Path:
    """The preset's checkpoint directory: the trained one, or, for a cost-only preset, its
    seeded random weights saved once to the cache (loading needs something on disk)."""
    preset = get_preset(preset_name)
    if not preset.cost_only:
        path = checkpoint_path(preset, cache)
        if not path.is_dir():
            raise CompoundError(
                f"no trained checkpoint for preset {preset_name!r} in {cache}; "
                f"run `compound train --preset {preset_name}` first"
            )
        return path
    name = str(dtype).removeprefix("torch.")
    path = cache / "checkpoints" / f"{preset.name}-random-{name}-{checkpoint_key(preset)}"
    if not path.is_dir():
        bundle = build_bundle(preset.name, dtype=dtype, materialize=True, seed=0)
        save_checkpoint(bundle, path, {"note": "random weights (seed 0) for cold-start timing"})
    return path


def _evict_files(files: list[Path]) -> None:
    for file in files:
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # dirty pages cannot be evicted
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def evict(files: list[Path], how: str) -> str:
    """Evict the weights' pages as asked; what was done, in words."""
    if how == "none":
        return "page cache kept (warm start)"
    if how == "all":
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            return "whole page cache dropped (drop_caches)"
        except OSError as error:
            _evict_files(files)
            return (
                f"drop_caches refused ({error.strerror or error}); the weight files' pages "
                "evicted instead (posix_fadvise)"
            )
    _evict_files(files)
    return "the weight files' pages evicted (posix_fadvise); libraries stay cached"


def _child_command(settings: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "bench.measure.coldstart_child", json.dumps(settings)]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    return env


def _mapped(configuration: Configuration) -> bool:
    return any(
        get_transform(spec.name, spec.params).load_options.get("mapped")
        for spec in configuration.transforms
    )


def cold_start(
    directory: Path,
    configuration: Configuration,
    dtype: str,
    threads: int,
    how: str,
    repeat: int,
) -> ColdStart:
    """One fresh process loading `directory` for `configuration`, up to its first token."""
    files = [directory / "model.safetensors"]
    if _mapped(configuration):
        files.append(aligned_copy(directory, getattr(torch, dtype)) / "model.safetensors")
    eviction = evict(files, how)
    settings = {
        "directory": str(directory),
        "transforms": [asdict(spec) for spec in configuration.transforms],
        "dtype": dtype,
        "threads": threads,
    }
    command = _child_command(settings)
    spawned = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=_child_env())
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CompoundError(f"cold-start process ({configuration.name}) failed: {last}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    return ColdStart(
        config=configuration.name,
        repeat=repeat,
        spawn_s=record["started"] - spawned,
        import_s=record["imported"] - record["started"],
        load_s=record["loaded"] - record["imported"],
        first_token_s=record["first_token"] - record["loaded"],
        total_s=record["first_token"] - spawned,
        major_faults=record["major_faults"],
        minor_faults=record["minor_faults"],
        block_reads=record["block_reads"],
        peak_rss_mib=record["peak_rss_kib"] / 1024,
        eviction=eviction,
    )


def run_cold_starts(
    directory: Path,
    configurations: tuple[Configuration, ...],
    *,
    repeats: int,
    dtype: str,
    threads: int,
    how: str,
    seed: int = 0,
    advance: Callable[[], None] = lambda: None,
) -> list[ColdStart]:
    """`repeats` fresh processes per configuration, shuffled within each repeat."""
    if any(_mapped(c) for c in configurations):
        aligned_copy(directory, getattr(torch, dtype))  # made once, before any timing
    order = random.Random(seed)
    results = []
    for repeat in range(repeats):
        shuffled = list(configurations)
        order.shuffle(shuffled)
        for configuration in shuffled:
            results.append(cold_start(directory, configuration, dtype, threads, how, repeat))
            advance()
    return results


def summarize(results: list[ColdStart], reference: str = BASELINE) -> dict[str, Any]:
    """Per configuration, the median of each phase and of the counters; per other
    configuration, the median per-repeat ratio reference/configuration of load and of total
    time, with a bootstrap interval over repeats (above 1: faster than the reference)."""
    by_config: dict[str, list[ColdStart]] = {}
    for result in results:
        by_config.setdefault(result.config, []).append(result)
    medians = {
        config: {
            field: float(np.median([getattr(r, field) for r in runs]))
            for field in (*PHASES, "major_faults", "block_reads", "peak_rss_mib")
        }
        for config, runs in by_config.items()
    }
    speedups: dict[str, dict[str, Any]] = {}
    base = {r.repeat: r for r in by_config.get(reference, [])}
    for config, runs in by_config.items():
        if config == reference or not base:
            continue
        speedups[config] = {
            phase: _ratio(
                [
                    getattr(base[r.repeat], phase) / getattr(r, phase)
                    for r in runs
                    if r.repeat in base
                ]
            )
            for phase in ("load_s", "total_s")
        }
    return {"medians": medians, "reference": reference, "speedup": speedups}


def _ratio(values: list[float]) -> dict[str, float]:
    median, low, high = median_ratio(values)
    return {"median": median, "low": low, "high": high}
