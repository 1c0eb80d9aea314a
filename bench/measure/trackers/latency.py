"""One clock for every timer, correct on CPU and CUDA, and the per-request timing record.

GPU work is asynchronous, so on CUDA a moment is a recorded CUDA event, read only after a
synchronize; on CPU it is the host clock (`perf_counter_ns`). The request timer, the
per-module hooks and the transform-event tracker all take their marks from a `Clock`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from core.units import MS_PER_S, NS_PER_S

Device = torch.device | str
Mark = Any  # an int (nanoseconds) on CPU, a recorded torch.cuda.Event on CUDA


def is_cuda(device: Device) -> bool:
    """True when `device` names a CUDA device (events and syncs are needed)."""
    return torch.device(device).type == "cuda"


def synchronize(device: Device) -> None:
    """Wait for queued GPU work on `device`; a no-op on CPU, where work is synchronous."""
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


class Clock:
    """Marks moments on one device; `seconds(start, end)` reads an interval.

    On CUDA, read intervals only after `synchronize()`; events handed back with `release`
    are reused, so steady-state marking allocates nothing (it runs inside forward hooks).
    """

    def __init__(self, device: Device) -> None:
        self.device = torch.device(device)
        self.cuda = is_cuda(self.device)
        self._pool: list[torch.cuda.Event] = []

    def mark(self) -> Mark:
        if not self.cuda:
            return time.perf_counter_ns()
        event = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Mark, end: Mark) -> float:
        if not self.cuda:
            return (end - start) / NS_PER_S
        return start.elapsed_time(end) / MS_PER_S

    def synchronize(self) -> None:
        synchronize(self.device)

    def release(self, marks: Iterable[Mark]) -> None:
        """Hand CUDA events back for reuse (nothing to do on CPU)."""
        if self.cuda:
            self._pool.extend(marks)


@dataclass
class RequestTiming:
    """Phase times of one generation request, in seconds.

    `prefill` is the time to the first token, so the first token is prefill's;
    `decode` is the total time of the `decode_tokens` tokens produced after it, and
    `decode_per_token` keeps each decode step's time.
    """

    prefill: float
    end_to_end: float
    decode: float = 0.0
    decode_tokens: int = 0
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
        cls, prefill: float, token_times: Sequence[float], end_to_end: float
    ) -> RequestTiming:
        """Build from per-decode-step times, so total and count cannot disagree."""
        return cls(
            prefill=prefill,
            end_to_end=end_to_end,
            decode=float(sum(token_times)),
            decode_tokens=len(token_times),
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


def set_threads(n: int) -> int:
    """Set torch's intra-op thread count explicitly; returns the count in effect, to record."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    return torch.get_num_threads()
