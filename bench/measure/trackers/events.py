"""The listener on a bundle's events: times the spans transforms open, keeps what they report.

Transforms never read a clock (`models.events`); this tracker does, with the same `Clock` as
every other timer: on CUDA a span is two events on the current stream, read after one sync
when the block's samples are drained, so timing a span adds no synchronisation to serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from bench.measure.trackers.latency import Clock, Device, Mark
from core.samples import Sample


class EventTracker:
    """Attach with `bundle.events.listener = tracker`; drain with `samples()` after a block."""

    def __init__(self, device: Device) -> None:
        self.clock = Clock(device)
        self._spans: list[tuple[str, str, Mark, Mark]] = []
        self._values: list[tuple[str, float, str, str]] = []

    @contextmanager
    def span(self, name: str, module: str) -> Iterator[None]:
        """Time the body; a body that raises is not recorded (a failed call measures nothing)."""
        start = self.clock.mark()
        yield
        self._spans.append((name, module, start, self.clock.mark()))

    def value(self, name: str, value: float, unit: str, module: str) -> None:
        self._values.append((name, float(value), unit, module))

    def samples(self, config: str, block: int, t_start: float, t_end: float) -> list[Sample]:
        """Everything recorded since the last drain, as samples of one block; then forget it."""
        if self._spans:
            self.clock.synchronize()
        spans = [
            (name, self.clock.seconds(start, end), "s", module)
            for name, module, start, end in self._spans
        ]
        records = [*spans, *self._values]
        self.clock.release(mark for *_, start, end in self._spans for mark in (start, end))
        self._spans.clear()
        self._values.clear()
        return [
            Sample(config, block, name, value, unit, module=module, t_start=t_start, t_end=t_end)
            for name, value, unit, module in records
        ]
