"""The one record every tracker emits and the store keeps: a raw, unsummarised measurement."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Source = Literal["measured", "estimated", "declared", "derived"]
SOURCES: tuple[str, ...] = ("measured", "estimated", "declared", "derived")
# The `extra` field naming the epoch (worker process) a sample was measured in.
PROCESS_KEY = "process"
BATCH_KEY = "batch_size"
# The `extra` field that marks a sample of the isolated memory pass of a co-resident run.
PASS_KEY = "pass"
MEMORY_PASS = "memory"
# Block index of memory-pass process m: MEMORY_BLOCK − m, far below the cold blocks (−1 − epoch).
MEMORY_BLOCK = -1_000_000


def process_of(extra: object) -> int:
    """The epoch of a sample's `extra`; runs from before replication had only epoch 0."""
    return int(extra.get(PROCESS_KEY, 0)) if isinstance(extra, dict) else 0


def batch_of(extra: object) -> int | None:
    """The batch size a sample was served at; None for records that belong to no one batch
    size (cold starts, applied figures) and for runs from before batching (all at 1)."""
    if isinstance(extra, dict) and BATCH_KEY in extra:
        return int(extra[BATCH_KEY])
    return None


@dataclass
class Sample:
    """One value of one metric, from one timed block of one configuration.

    `module` is "total" for whole-request figures, else a bundle handle name
    (for example "vision_encoder" or "layers.3.mlp"). `source` says how the value
    was obtained, so measured and estimated figures never mix silently.
    """

    config: str
    block: int
    metric: str
    value: float
    unit: str
    module: str = "total"
    source: Source = "measured"
    t_start: float = 0.0
    t_end: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown sample source {self.source!r}; expected one of {SOURCES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        return cls(**data)
