"""Per-module time attribution with forward hooks.

The hooks only take a mark from the clock (a timestamp on CPU, a pooled CUDA event on GPU), so
their cost stays small; the worker measures that cost in place (the hooked pass against the
unhooked block) and reports it. End-to-end latency is measured elsewhere with hooks off.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from bench.measure.trackers.latency import Clock, Device, Mark


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
    """Start/end marks of one handle, from the timer's clock."""

    __slots__ = ("starts", "ends")

    def __init__(self) -> None:
        self.starts: list[Mark] = []
        self.ends: list[Mark] = []


class ModuleTimer:
    """Context manager summing, per named module, the time spent in its forward.

    Modules called many times per request (decoder layers during generation) have
    every call summed and counted. On CUDA, events are recorded in the hooks and
    resolved after one synchronize in `collect()`. Events go on the current stream:
    modules run on side streams are timed on whichever stream is current when the hook fires.
    """

    def __init__(self, modules: Mapping[str, nn.Module], device: Device) -> None:
        check_not_nested(modules)
        self.modules = dict(modules)
        self.clock = Clock(device)
        self._marks = {name: _Marks() for name in self.modules}
        self._seconds: dict[str, float] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
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
        """Hooks bound to this handle's lists; they take one mark each and nothing else."""
        push_start, push_end, mark = marks.starts.append, marks.ends.append, self.clock.mark

        def pre(_module: nn.Module, _args: Any) -> None:
            push_start(mark())

        def post(_module: nn.Module, _args: Any, _out: Any) -> None:
            push_end(mark())

        return pre, post

    def collect(self) -> dict[str, ModuleTime]:
        """Totals per handle since entry (or `reset`); resolves pending marks, syncing once."""
        if any(m.starts for m in self._marks.values()):
            self.clock.synchronize()
        for name, marks in self._marks.items():
            if len(marks.starts) != len(marks.ends):
                raise RuntimeError(
                    f"module {name!r} has {len(marks.starts)} forward starts but "
                    f"{len(marks.ends)} ends: collect() was called during its forward"
                )
            self._seconds[name] += sum(
                self.clock.seconds(start, end)
                for start, end in zip(marks.starts, marks.ends, strict=True)
            )
            self._calls[name] += len(marks.ends)
            self._forget(marks)
        return {name: ModuleTime(self._seconds[name], self._calls[name]) for name in self.modules}

    def _forget(self, marks: _Marks) -> None:
        # Clear in place: the hooks hold these lists' bound append methods.
        self.clock.release(marks.starts)
        self.clock.release(marks.ends)
        marks.starts.clear()
        marks.ends.clear()

    def reset(self) -> None:
        """Zero the totals and drop pending marks (pooled CUDA events are kept)."""
        for marks in self._marks.values():
            self._forget(marks)
        self._seconds = dict.fromkeys(self.modules, 0.0)
        self._calls = dict.fromkeys(self.modules, 0)
