"""A stored run as a pytest-benchmark JSON file, so `pytest-benchmark compare` (its table,
its --histogram) reads our runs beside a user's own pytest-benchmark history.

One benchmark per configuration: its data are the run's per-round latencies at its primary
batch size (seconds per request, the block mean of `latency_mean_s`), its statistics computed
by pytest-benchmark's own `Stats` from them. `machine_info` and `commit_info` come from the
run's stored environment, not from the machine that exports. Rounds from all worker
processes are pooled, as pytest-benchmark has no notion of processes; compound's own
intervals (`compound compare`) keep them apart.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from bench.judge.analysis import block_values, primary_samples

METRIC = "latency_mean_s"
FORMAT_NOTE = "exported by compound-bench from a stored run"


def _machine_info(meta: dict[str, Any]) -> dict[str, Any]:
    environment = meta.get("environment") or {}
    versions = environment.get("versions") or {}
    cpu = environment.get("cpu") or {}
    platform_text = str(environment.get("platform") or "")
    return {
        "node": environment.get("hostname"),
        "processor": cpu.get("model"),
        "machine": "x86_64" if "x86_64" in platform_text else None,
        "python_compiler": None,
        "python_implementation": "CPython",
        "python_implementation_version": versions.get("python"),
        "python_version": versions.get("python"),
        "python_build": None,
        "release": platform_text,
        "system": platform_text.split("-")[0] or None,
        "cpu": {"brand_raw": cpu.get("model"), "count": cpu.get("logical_cpus")},
        "compound": {
            "device": environment.get("device"),
            "gpu": environment.get("gpu"),
            "torch": versions.get("torch"),
            "transformers": versions.get("transformers"),
            "threads": cpu.get("torch_threads"),
        },
    }


def _commit_info(meta: dict[str, Any]) -> dict[str, Any]:
    git = (meta.get("environment") or {}).get("git") or {}
    return {
        "id": git.get("commit"),
        "time": meta.get("created"),
        "author_time": None,
        "dirty": bool(git.get("dirty")),
        "project": "compound-bench",
        "branch": None,
    }


def _benchmark(meta: dict[str, Any], config: str, data: list[float]) -> dict[str, Any]:
    from pytest_benchmark.stats import Stats

    stats = Stats()
    for value in data:
        stats.update(value)
    protocol = (meta.get("config") or {}).get("protocol") or {}
    transforms = next(
        (
            c.get("transforms", [])
            for c in (meta.get("config") or {}).get("configurations", [])
            if c.get("name") == config
        ),
        [],
    )
    return {
        "group": meta.get("run_id"),
        "name": config,
        "fullname": f"compound::{meta.get('run_id')}::{config}",
        "params": {"transforms": [t.get("name") for t in transforms]},
        "param": config,
        "extra_info": {"metric": METRIC, "unit": "s per request", "note": FORMAT_NOTE},
        "options": {
            "disable_gc": False,
            "timer": "perf_counter",
            "min_rounds": protocol.get("min_rounds"),
            "max_time": None,
            "min_time": protocol.get("min_seconds"),
            "warmup": True,
        },
        "stats": {**stats.as_dict(), "data": data, "iterations": 1},
    }


def export(meta: dict[str, Any], samples: pd.DataFrame) -> dict[str, Any]:
    """The pytest-benchmark document for one run."""
    table = block_values(primary_samples(meta, samples), METRIC)
    benchmarks = [
        _benchmark(meta, config, [float(v) for v in table[config].dropna()])
        for config in table.columns
        if table[config].notna().sum() > 0
    ]
    from pytest_benchmark import __version__

    return {
        "machine_info": _machine_info(meta),
        "commit_info": _commit_info(meta),
        "benchmarks": benchmarks,
        "datetime": meta.get("updated") or meta.get("created"),
        "version": __version__,
    }
