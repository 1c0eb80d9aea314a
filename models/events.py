"""What a transform says happened while the model served: spans for a tracker to time, values.

A transform never reads a clock (the measuring belongs to the harness's trackers). Around the
work it adds it opens a span (`events.span("sleep_wake_s", "vision_encoder")`), and it reports
what it knows (`events.value("pruning_kept_fraction", 0.5, "fraction")`). A listener, the
worker's event tracker, times the spans and records the values; with none attached both are
free. A cloned bundle gets a fresh, unattached `Events`: listeners belong to one process.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol


class EventListener(Protocol):
    def span(self, name: str, module: str) -> AbstractContextManager[Any]: ...

    def value(self, name: str, value: float, unit: str, module: str) -> None: ...


class Events:
    """The bundle's event channel; `listener` is attached by whoever measures."""

    def __init__(self) -> None:
        self.listener: EventListener | None = None

    def span(self, name: str, module: str = "total") -> AbstractContextManager[Any]:
        """A context around work a transform adds; timed only when someone listens."""
        return nullcontext() if self.listener is None else self.listener.span(name, module)

    def value(self, name: str, value: float, unit: str, module: str = "total") -> None:
        if self.listener is not None:
            self.listener.value(name, value, unit, module)

    def __deepcopy__(self, memo: dict[int, Any]) -> Events:
        return Events()
