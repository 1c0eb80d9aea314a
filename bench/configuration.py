"""What a run measures: where the model comes from, the configurations, and the run protocol."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkloadSpec:
    """What each timed block serves: requests from the held-out test split, mixed by modality."""

    requests_per_block: int = 8
    image_fraction: float = 0.5
    new_tokens: int = 8
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelSource:
    """A trained or cost-only preset (from the cache), or a checkpoint directory.

    `trained` says whether a checkpoint directory from elsewhere is trained: only the user
    knows, so it is False unless they say so (our own checkpoints record it themselves).
    """

    preset: str | None = None
    model_path: str | None = None
    cache_dir: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    trained: bool = False

    def describe(self) -> str:
        return self.model_path or str(self.preset)


@dataclass(frozen=True)
class TransformSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Configuration:
    """An ordered list of transforms; the empty one is the baseline.

    `slowdown` exists for calibration only: it stretches every request by a known fraction
    (busy-waiting), giving a copy of a configuration whose true Δ is known.
    """

    name: str
    transforms: tuple[TransformSpec, ...] = ()
    slowdown: float = 0.0


@dataclass(frozen=True)
class Protocol:
    """The run protocol: warm-up, then rounds until both minima (rounds, timed seconds) are met."""

    warmup_requests: int = 3
    min_rounds: int = 10
    min_seconds: float = 20.0  # timed seconds per configuration
    max_seconds: float | None = None  # wall budget for the timed rounds; None = no cap
    threads: int = 2
    seed: int = 0
    # A hooked pass (per-module shares) after every n-th block; 0 = never. Shares are means over
    # those blocks with their spread (share_sd); hooking every block would double the run time.
    module_pass_every: int = 4
    watts_per_core: float = 7.5
    price_per_device_hour: float = 0.10
    grid_g_per_kwh: float = 475.0
    eval_examples: int = 2000  # held-out examples scored per configuration before timing


@dataclass(frozen=True)
class RunSpec:
    """A suite: the model, the configurations the designs produced, workload and protocol.

    `transforms` is the suite's transform list in stacking order (those that can run here),
    and `designs` the designs that built `configurations` from it; the verdict reads both.
    """

    source: ModelSource
    configurations: tuple[Configuration, ...]
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    protocol: Protocol = field(default_factory=Protocol)
    transforms: tuple[TransformSpec, ...] = ()
    designs: tuple[str, ...] = ()
    aa_control: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        configurations = tuple(
            Configuration(
                name=c["name"],
                transforms=_specs(c["transforms"]),
                slowdown=c.get("slowdown", 0.0),
            )
            for c in data["configurations"]
        )
        return cls(
            source=ModelSource(**data["source"]),
            configurations=configurations,
            workload=WorkloadSpec(**data["workload"]),
            protocol=Protocol(**data["protocol"]),
            transforms=_specs(data.get("transforms", [])),
            designs=tuple(data.get("designs", [])),
            aa_control=data.get("aa_control", False),
        )


def _specs(records: list[dict[str, Any]]) -> tuple[TransformSpec, ...]:
    return tuple(TransformSpec(t["name"], dict(t["params"])) for t in records)
