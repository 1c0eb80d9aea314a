"""Where a run came from: versions, hardware, clocks, git commit, seed.

Every result carries this so two runs can be told apart and compared fairly.
Each piece is collected on its own and a missing one becomes None: recording the
environment must never be the reason a benchmark fails.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.measure.trackers.nvml import nvml_handle, nvml_text

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_PACKAGES = ("torch", "transformers", "numpy", "pandas")

T = TypeVar("T")


def _safe(fn: Callable[[], T]) -> T | None:
    """fn(), or None if it fails for any reason (missing library, driver, file)."""
    try:
        return fn()
    except Exception:  # environment probing: any failure just means "unknown"
        return None


def versions() -> dict[str, str | None]:
    """Python and key package versions, from installed metadata (no heavy imports)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        found[name] = _safe(lambda name=name: metadata.version(name))
    found["torch"] = torch.__version__  # the imported one, which is what ran
    return found


def cpu_model() -> str | None:
    """The CPU's marketing name from /proc/cpuinfo, else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*args: str) -> str:
    # --no-optional-locks: `status` must not rewrite the index while another process works.
    result = subprocess.run(
        ["git", "--no-optional-locks", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return result.stdout.strip()


def git_state() -> dict[str, Any]:
    """The project's HEAD commit and whether the tree has uncommitted changes."""
    commit = _safe(lambda: _git("rev-parse", "--verify", "HEAD"))
    dirty = _safe(lambda: bool(_git("status", "--porcelain"))) if commit else None
    return {"commit": commit, "dirty": dirty}


_NVML_FIELDS = (
    "driver_version",
    "cuda_driver_version",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "sm_clock_max_mhz",
    "power_limit_w",
)


def _nvml_fields(handle: Any) -> dict[str, Any]:
    """Driver, clocks and power limit from NVML; all None when NVML is unusable."""
    if handle is None:
        return dict.fromkeys(_NVML_FIELDS)
    import pynvml

    power_limit_mw = _safe(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    return {
        "driver_version": _safe(lambda: nvml_text(pynvml.nvmlSystemGetDriverVersion())),
        "cuda_driver_version": _safe(pynvml.nvmlSystemGetCudaDriverVersion),
        "sm_clock_mhz": _safe(lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
        "mem_clock_mhz": _safe(
            lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        ),
        "sm_clock_max_mhz": _safe(
            lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        ),
        "power_limit_w": power_limit_mw / 1000.0 if power_limit_mw is not None else None,
    }


def gpu_info(device: torch.device) -> dict[str, Any]:
    """Name, driver and CUDA versions, clocks and power limit of a CUDA device."""
    index = device.index if device.index is not None else (_safe(torch.cuda.current_device) or 0)
    return {
        "name": _safe(lambda: torch.cuda.get_device_name(index)),
        "cuda_runtime_version": torch.version.cuda,
        "memory_total_bytes": _safe(lambda: torch.cuda.get_device_properties(index).total_memory),
        **_nvml_fields(_safe(lambda: nvml_handle(index))),
    }


def collect_environment(device: torch.device, seed: int | None = None) -> dict[str, Any]:
    """A JSON-serialisable description of this run's software, hardware and source tree."""
    return {
        "versions": versions(),
        "platform": _safe(platform.platform),
        "hostname": _safe(socket.gethostname),
        "cpu": {
            "model": _safe(cpu_model),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": _safe(lambda: len(os.sched_getaffinity(0))),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
        },
        "device": str(device),
        "gpu": gpu_info(device) if device.type == "cuda" else None,
        "git": git_state(),
        "timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": seed,
    }
