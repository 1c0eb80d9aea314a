"""Latency timers that are correct on CPU and CUDA, and per-request timing containers.

GPU work is asynchronous, so on CUDA intervals are bracketed by CUDA events and read
only after one synchronize; on CPU the host clock (`perf_counter_ns`) is exact enough.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

Device = torch.device | str

_NS_PER_S = 1e9
_MS_PER_S = 1e3


def is_cuda(device: Device) -> bool:
    """True when `device` names a CUDA device (events and syncs are needed)."""
    return torch.device(device).type == "cuda"


def synchronize(device: Device) -> None:
    """Wait for queued GPU work on `device`; a no-op on CPU, where work is synchronous."""
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


class Stopwatch:
    """Accumulates named intervals; on CUDA many can be recorded before one sync reads them.

    Use `with sw.interval("prefill"): ...`, then `sw.durations()` once the work is done.
    An interval whose body raises is not recorded: a failed call is not a measurement.
    """

    def __init__(self, device: Device) -> None:
        self.device = torch.device(device)
        self._cuda = is_cuda(self.device)
        self._done: dict[str, list[float]] = {}
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def interval(self, name: str) -> Iterator[None]:
        """Time the body of the `with` block under `name`."""
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter_ns()
            yield
            t1 = time.perf_counter_ns()
            self._done.setdefault(name, []).append((t1 - t0) / _NS_PER_S)

    def durations(self) -> dict[str, list[float]]:
        """Seconds per interval, by name, in recording order (syncs once on CUDA)."""
        if self._pending:
            synchronize(self.device)
            for name, start, end in self._pending:
                seconds = start.elapsed_time(end) / _MS_PER_S
                self._done.setdefault(name, []).append(seconds)
            self._pending.clear()
        return {name: list(values) for name, values in self._done.items()}

    def reset(self) -> None:
        """Forget every interval, so one stopwatch can serve consecutive blocks."""
        self._done.clear()
        self._pending.clear()


def time_call(fn: Callable[[], object], device: Device) -> float:
    """Seconds for one call of `fn`, e.g. the cold first call.

    A cold call includes host-side work (loading, compilation) as well as GPU work, so
    this brackets the call with syncs and reads the host clock rather than events.
    """
    synchronize(device)
    t0 = time.perf_counter_ns()
    fn()
    synchronize(device)
    return (time.perf_counter_ns() - t0) / _NS_PER_S


@dataclass
class RequestTiming:
    """Phase times of one generation request, in seconds.

    `prefill` is the time to the first token, so the first token is prefill's;
    `decode` is the total time of the `decode_tokens` tokens produced after it.
    `vision_encode` and `projector` are None for text-only requests.
    `decode_per_token` optionally keeps each decode step's time (raw samples).
    """

    prefill: float
    end_to_end: float
    decode: float = 0.0
    decode_tokens: int = 0
    vision_encode: float | None = None
    projector: float | None = None
    decode_per_token: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.decode_tokens < 0:
            raise ValueError(f"decode_tokens must be >= 0, got {self.decode_tokens}")
        if self.decode_per_token and len(self.decode_per_token) != self.decode_tokens:
            raise ValueError(
                f"decode_per_token has {len(self.decode_per_token)} entries "
                f"but decode_tokens is {self.decode_tokens}"
            )

    @classmethod
    def from_token_times(
        cls,
        prefill: float,
        token_times: Sequence[float],
        end_to_end: float,
        vision_encode: float | None = None,
        projector: float | None = None,
    ) -> RequestTiming:
        """Build from per-decode-step times, so total and count cannot disagree."""
        return cls(
            prefill=prefill,
            end_to_end=end_to_end,
            decode=float(sum(token_times)),
            decode_tokens=len(token_times),
            vision_encode=vision_encode,
            projector=projector,
            decode_per_token=[float(t) for t in token_times],
        )

    @property
    def new_tokens(self) -> int:
        """Tokens generated: the first (from prefill) plus the decoded ones."""
        return 1 + self.decode_tokens

    @property
    def time_per_output_token(self) -> float | None:
        """Mean decode seconds per token after the first (TPOT); None with no decode."""
        return self.decode / self.decode_tokens if self.decode_tokens else None


def throughput(timings: Sequence[RequestTiming], wall_s: float) -> tuple[float, float]:
    """(requests/s, generated tokens/s) over a wall-clock window.

    Uses the window, not the sum of per-request times, so batched or overlapping
    requests are credited correctly.
    """
    if wall_s <= 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s}")
    tokens = sum(t.new_tokens for t in timings)
    return len(timings) / wall_s, tokens / wall_s


def set_threads(n: int) -> int:
    """Set torch's intra-op thread count explicitly; returns the count in effect, to record."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    return torch.get_num_threads()
