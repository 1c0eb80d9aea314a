"""Per-module time attribution with forward hooks, and the module shares it yields.

The hooks only append a timestamp (CPU) or record a pooled CUDA event, so their cost
stays small; `measure_hook_overhead` quantifies that cost so it can be reported.
End-to-end latency is measured elsewhere with hooks off.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bench.measure.trackers.latency import Device, is_cuda, synchronize, time_call

OTHER = "other"

_NS_PER_S = 1e9
_MS_PER_S = 1e3


class ShareOverrunWarning(UserWarning):
    """The hooked modules add up to more than the total: hook overhead or measurement error."""


@dataclass(frozen=True)
class ModuleTime:
    """Total forward seconds of one handle and how many forward calls they cover."""

    seconds: float
    calls: int


def check_not_nested(modules: Mapping[str, nn.Module]) -> None:
    """Raise ValueError if one handle is (inside) another: nested hooks double count."""
    for outer_name, outer in modules.items():
        inside = {id(m) for m in outer.modules()}
        for inner_name, inner in modules.items():
            if inner_name != outer_name and id(inner) in inside:
                raise ValueError(
                    f"module handle {inner_name!r} is inside handle {outer_name!r} "
                    "(or the same module); nested handles would double count"
                )


class _Marks:
    """Start/end marks of one handle: ints (ns) on CPU, CUDA events on GPU."""

    __slots__ = ("starts", "ends")

    def __init__(self) -> None:
        self.starts: list[Any] = []
        self.ends: list[Any] = []


class ModuleTimer:
    """Context manager summing, per named module, the time spent in its forward.

    Modules called many times per request (decoder layers during generation) have
    every call summed and counted. On CUDA, events are recorded in the hooks and
    resolved after one synchronize in `collect()`; events are pooled and reused, so
    steady-state hooks allocate nothing. Events go on the current stream: modules run
    on side streams are timed on whichever stream is current when the hook fires.
    """

    def __init__(self, modules: Mapping[str, nn.Module], device: Device) -> None:
        check_not_nested(modules)
        self.modules = dict(modules)
        self.device = torch.device(device)
        self._cuda = is_cuda(self.device)
        self._marks = {name: _Marks() for name in self.modules}
        self._seconds: dict[str, float] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
        self._event_pool: list[torch.cuda.Event] = []
        self.reset()

    def __enter__(self) -> ModuleTimer:
        if self._handles:
            raise RuntimeError("ModuleTimer is already active; nesting it would double count")
        self.reset()
        try:
            for name, module in self.modules.items():
                pre, post = self._make_hooks(self._marks[name])
                self._handles.append(module.register_forward_pre_hook(pre))
                self._handles.append(module.register_forward_hook(post, always_call=True))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hooks(self, marks: _Marks) -> tuple[Callable[..., None], Callable[..., None]]:
        """Hooks bound to this handle's lists; they do one append each and nothing else."""
        push_start, push_end = marks.starts.append, marks.ends.append
        if not self._cuda:
            clock = time.perf_counter_ns

            def pre_cpu(_module: nn.Module, _args: Any) -> None:
                push_start(clock())

            def post_cpu(_module: nn.Module, _args: Any, _out: Any) -> None:
                push_end(clock())

            return pre_cpu, post_cpu

        pool = self._event_pool
        take = pool.pop

        def event() -> torch.cuda.Event:
            ev = take() if pool else torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev

        def pre_cuda(_module: nn.Module, _args: Any) -> None:
            push_start(event())

        def post_cuda(_module: nn.Module, _args: Any, _out: Any) -> None:
            push_end(event())

        return pre_cuda, post_cuda

    def collect(self) -> dict[str, ModuleTime]:
        """Totals per handle since entry (or `reset`); resolves pending marks, syncing once."""
        if self._cuda and any(m.starts for m in self._marks.values()):
            synchronize(self.device)
        for name, marks in self._marks.items():
            if len(marks.starts) != len(marks.ends):
                raise RuntimeError(
                    f"module {name!r} has {len(marks.starts)} forward starts but "
                    f"{len(marks.ends)} ends: collect() was called during its forward"
                )
            self._seconds[name] += self._resolve(marks)
            self._calls[name] += len(marks.ends)
            # Clear in place: the hooks hold these lists' bound append methods.
            marks.starts.clear()
            marks.ends.clear()
        return {name: ModuleTime(self._seconds[name], self._calls[name]) for name in self.modules}

    def _resolve(self, marks: _Marks) -> float:
        if not self._cuda:
            return (sum(marks.ends) - sum(marks.starts)) / _NS_PER_S
        ms = sum(s.elapsed_time(e) for s, e in zip(marks.starts, marks.ends, strict=True))
        self._event_pool.extend(marks.starts)
        self._event_pool.extend(marks.ends)
        return ms / _MS_PER_S

    def reset(self) -> None:
        """Zero the totals and drop pending marks (pooled CUDA events are kept)."""
        for marks in self._marks.values():
            if self._cuda:
                self._event_pool.extend(marks.starts)
                self._event_pool.extend(marks.ends)
            marks.starts.clear()
            marks.ends.clear()
        self._seconds = dict.fromkeys(self.modules, 0.0)
        self._calls = dict.fromkeys(self.modules, 0)


def module_shares(module_seconds: Mapping[str, float], total_seconds: float) -> dict[str, float]:
    """Each module's share of `total_seconds`, plus "other" for the rest; shares sum to 1.

    "Other" covers what no handle covers (embeddings, norms, sampling, Python). If the
    modules add up to more than the total, "other" is left negative rather than clipped,
    and a ShareOverrunWarning is issued: `shares["other"] < 0` is the flag to record.
    """
    if total_seconds <= 0:
        raise ValueError(f"total_seconds must be > 0, got {total_seconds}")
    if OTHER in module_seconds:
        raise ValueError(f"{OTHER!r} is reserved for the unattributed remainder")
    negative = {k: v for k, v in module_seconds.items() if v < 0}
    if negative:
        raise ValueError(f"module times must be >= 0, got {negative}")
    shares = {name: seconds / total_seconds for name, seconds in module_seconds.items()}
    attributed = sum(module_seconds.values())
    shares[OTHER] = (total_seconds - attributed) / total_seconds
    if attributed > total_seconds:
        warnings.warn(
            f"hooked modules sum to {attributed:.6g} s, more than the total "
            f"{total_seconds:.6g} s; 'other' share is {shares[OTHER]:.4f}",
            ShareOverrunWarning,
            stacklevel=2,
        )
    return shares


def measure_hook_overhead(
    run: Callable[[], None],
    modules: Mapping[str, nn.Module],
    device: Device,
    repeats: int,
) -> dict[str, Any]:
    """Median seconds of `run` with hooks off and on, interleaved, and the relative cost.

    Pairs alternate order (off-on, on-off, ...) so linear drift cancels. Only the
    call itself is timed; `collect()` runs outside the timed region. Warm up first:
    every call here is counted.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timer = ModuleTimer(modules, device)
    off_s: list[float] = []
    on_s: list[float] = []

    def hooked() -> None:
        with timer:
            on_s.append(time_call(run, device))
        timer.collect()

    for i in range(repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        for hooks_on in order:
            if hooks_on:
                hooked()
            else:
                off_s.append(time_call(run, device))
    off_median = float(np.median(off_s))
    on_median = float(np.median(on_s))
    return {
        "repeats": repeats,
        "off_s": off_s,
        "on_s": on_s,
        "off_median_s": off_median,
        "on_median_s": on_median,
        "overhead_s": on_median - off_median,
        "overhead_rel": (on_median - off_median) / off_median,
    }
