"""Memory: peak device memory, this process's GPU memory per NVML, host RSS, model bytes.

The runner gives each configuration its own worker process, so host memory is
that configuration's own. Linux's per-process peak RSS (VmHWM) is reset on
entering each window (`reset_peak_rss`), so `peak_rss_bytes` is the window's
peak, not the process's lifetime peak (which would include loading). On CUDA the
allocator's peak is reset on entering the window, so `peak_allocated_bytes` and
`peak_reserved_bytes` cover the window only; NVML's per-process figure adds the
CUDA context and anything outside torch's allocator. NVML's device-wide figure
includes other processes and is never used.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from typing import Any

import psutil
import torch
from torch import nn

from bench.measure.trackers.nvml import nvml_handle
from core.samples import Sample, Source


def _tensor_bytes(tensor: torch.Tensor, seen: set[tuple[str, int]]) -> int:
    """Bytes of the tensor's storage, or 0 when that storage was already counted.

    Meta tensors have no storage to share (all report address 0), so they count
    by shape × itemsize; the caller deduplicates tied meta parameters by identity.
    """
    if tensor.device.type == "meta":
        return tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    key = (str(tensor.device), storage.data_ptr())
    if storage.data_ptr() != 0 and key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()


def tensor_bytes(module: nn.Module) -> dict[str, int]:
    """Exact bytes held by a module's parameters and buffers, each storage once.

    Tied weights (one Parameter under two names, or two tensors on one storage)
    count once; a buffer sharing a parameter's storage adds nothing. Returns
    {"param_bytes", "buffer_bytes", "meta_tensors"}; the last counts tensors sized
    from their shape only (meta device), whose bytes are not actually allocated.
    """
    seen: set[tuple[str, int]] = set()
    params = list(module.parameters())  # deduplicates tied Parameters by identity
    buffers = list(module.buffers())
    return {
        "param_bytes": sum(_tensor_bytes(p, seen) for p in params),
        "buffer_bytes": sum(_tensor_bytes(b, seen) for b in buffers),
        "meta_tensors": sum(t.device.type == "meta" for t in params + buffers),
    }


def _vm_hwm_bytes() -> int | None:
    """Linux's per-address-space peak RSS (VmHWM), or None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process over its life.

    On Linux this reads VmHWM, not getrusage's ru_maxrss: a spawned worker's ru_maxrss starts
    at its parent's peak (the kernel carries it across exec), so after the parent trained a
    model every worker would report at least the parent's peak. VmHWM belongs to the worker's
    own address space.
    """
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset Linux's VmHWM to the current RSS, so the next read is this window's own peak.

    Without it every block would report the same lifetime peak (rounds would not be
    replicates of anything). False where /proc/self/clear_refs is not writable.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def nvml_process_bytes(device_index: int, pid: int | None = None) -> tuple[float, str | None]:
    """GPU memory NVML attributes to `pid` (default: this process) and a warning.

    Returns NaN with a warning when NVML is unusable or does not list the pid (a
    container's PID namespace hides host pids from us): never the device total.
    """
    try:
        import pynvml
    except ImportError as err:
        return math.nan, f"pynvml unavailable: {err}"
    pid = os.getpid() if pid is None else pid
    try:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(nvml_handle(device_index))
    except pynvml.NVMLError as err:
        return math.nan, f"NVML process list unavailable: {err}"
    for proc in processes:
        if proc.pid == pid:
            if proc.usedGpuMemory is None:
                return math.nan, "NVML reports this process's memory as not available"
            return float(proc.usedGpuMemory), None
    return math.nan, f"pid {pid} not in NVML's process list (PID namespace?)"


class MemoryTracker:
    """Context manager recording memory over a window; read `samples()` afterwards.

    Host RSS is recorded on every device (host memory is real on GPU runs too);
    CUDA peaks and NVML's per-process figure only on CUDA. Pass `module` to also
    record its exact parameter and buffer bytes.
    """

    def __init__(self, device: torch.device, module: nn.Module | None = None) -> None:
        self.device = device
        self.module = module
        self.values: dict[str, tuple[float, Source, dict[str, Any]]] = {}
        self.t_start = 0.0
        self.t_end = 0.0
        self._rss_at_enter = 0
        self._peak_reset = False

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def __enter__(self) -> MemoryTracker:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak_reset = reset_peak_rss()
        self._rss_at_enter = psutil.Process().memory_info().rss
        self.t_start = time.time()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self._record_cuda()
        self.t_end = time.time()
        scope = "window" if self._peak_reset else "process lifetime"
        self._record("peak_rss_bytes", peak_rss_bytes(), extra={"scope": scope})
        self._record(
            "rss_bytes", psutil.Process().memory_info().rss, {"rss_at_enter": self._rss_at_enter}
        )
        if self.module is not None:
            self._record_module(self.module)

    def _record(
        self, metric: str, value: float, extra: dict[str, Any], source: Source = "measured"
    ) -> None:
        self.values[metric] = (float(value), source, extra)

    def _record_cuda(self) -> None:
        self._record("peak_allocated_bytes", torch.cuda.max_memory_allocated(self.device), {})
        self._record("peak_reserved_bytes", torch.cuda.max_memory_reserved(self.device), {})
        value, warning = nvml_process_bytes(self.device.index or 0)
        self._record("nvml_process_bytes", value, {"warning": warning, "pid": os.getpid()})

    def _record_module(self, module: nn.Module) -> None:
        counts = tensor_bytes(module)
        # Meta tensors are sized from shape, not allocated: a derived figure.
        source: Source = "derived" if counts["meta_tensors"] else "measured"
        extra = {"exact": True, "meta_tensors": counts["meta_tensors"]}
        self._record("param_bytes", counts["param_bytes"], extra, source)
        self._record("buffer_bytes", counts["buffer_bytes"], extra, source)

    def samples(self, config: str, block: int) -> list[Sample]:
        """One Sample per recorded metric (unit "bytes"), stamped with the window times."""
        return [
            Sample(
                config=config,
                block=block,
                metric=metric,
                value=value,
                unit="bytes",
                source=source,
                t_start=self.t_start,
                t_end=self.t_end,
                extra=dict(extra),
            )
            for metric, (value, source, extra) in self.values.items()
        ]
