"""What a run measures: where the model comes from, the configurations, and the run protocol."""

from __future__ import annotations

import math
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from core.errors import CompoundError
from models.generation import DTYPES, ENGINES
from models.presets import get_preset
from optimizations.registry import transform_classes


@dataclass(frozen=True)
class WorkloadSpec:
    """What each timed block serves: requests from the held-out test split, mixed by modality."""

    requests_per_block: int = 8
    image_fraction: float = 0.5
    new_tokens: int = 8
    seed: int = 0
    # Share of image requests that show an earlier request's image again (a vision cache's
    # hits); each repeat keeps its own question.
    image_reuse: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ServingSpec:
    """How requests are served, the same for every configuration: the stage the techniques
    stand on, not a technique. See `models.generation` for the engines.

    Every block serves its requests at each batch size in turn (`batch_sizes`, the first one
    primary), so batch sizes are compared inside the same rounds and processes.
    """

    engine: str = "eager"
    batch_sizes: tuple[int, ...] = (1,)

    @property
    def primary_batch(self) -> int:
        return self.batch_sizes[0]


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
    """The run protocol: warm-up, then rounds until both minima (rounds, timed seconds) are met.

    The minima are totals per configuration, split evenly over `processes` epochs: every
    configuration's worker is restarted between epochs, so each is measured in that many
    processes and the process offset enters every interval (`bench.judge.replicated`).
    """

    warmup_requests: int = 3
    min_rounds: int = 10
    min_seconds: float = 30.0  # timed seconds per configuration, over all its processes
    processes: int = 1
    max_alive: int = 0  # workers alive at once; 0 = one per configuration (all of them)
    min_block_seconds: float = 0.0  # a block serves its requests again until this long
    start_method: str = "spawn"  # how workers start: "spawn" or "forkserver"
    # "isolated": one configuration per worker process; "coresident": one process holds every
    # configuration of an epoch and rotates among them (see `bench.measure.runner`).
    placement: str = "isolated"
    # With co-resident placement each configuration's memory is measured apart: this many
    # isolated processes per configuration, one block each, before the timed rounds (0: none,
    # and peak memory per configuration goes unmeasured).
    memory_processes: int = 3
    # Look at the verdict after half, three quarters and all of the processes, and stop
    # once the latency residual is decisive (`bench.judge.sequential`).
    sequential: bool = False
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
    # Fixed before the run, never widened for noise: "compounds" needs the residual's interval
    # inside ±margin (a fraction, 0.02 = 2 percentage points of saving); memory adds up when
    # its residual lies within both ±memory_margin_mib and ±memory_margin_fraction of the base.
    margin: float = 0.02
    memory_margin_mib: float = 1.0
    memory_margin_fraction: float = 0.01


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
    serving: ServingSpec = field(default_factory=ServingSpec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str | None = None) -> RunSpec:
        """Rebuild a stored spec, checked field by field: a damaged file must not pass silently.

        `origin` (the file it came from) starts the error message.
        """
        try:
            spec = _build(cls, data, "config")
            _check_stored(spec)
            return spec
        except _Invalid as invalid:
            where = f"{origin}: " if origin else ""
            raise CompoundError(f"{where}{invalid}; fix it there or start a new run") from None


class _Invalid(ValueError):
    """A stored value that does not fit its field; the message starts with the field path."""


START_METHODS = ("spawn", "forkserver")
PLACEMENTS = ("isolated", "coresident")
# field → (lowest, highest) allowed in a stored run; None: unbounded on that side. The same
# ranges the command line enforces (without its caps, which --no-limits may have lifted).
_SEED = (0, 2**32 - 1)
_RANGES: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "protocol": {
        "warmup_requests": (0, None),
        "min_rounds": (1, None),
        "min_seconds": (0, None),
        "processes": (1, None),
        "max_alive": (0, None),
        "memory_processes": (0, None),
        "min_block_seconds": (0, None),
        "threads": (1, 1024),
        "seed": _SEED,
        "module_pass_every": (0, None),
        "watts_per_core": (1e-9, 1000),
        "price_per_device_hour": (0, 10_000),
        "grid_g_per_kwh": (0, 2000),
        "eval_examples": (0, None),
        "margin": (1e-9, 1),
        "memory_margin_mib": (0, None),
        "memory_margin_fraction": (0, 1),
    },
    "workload": {
        "requests_per_block": (1, None),
        "image_fraction": (0, 1),
        "image_reuse": (0, 1),
        "new_tokens": (1, None),
        "seed": _SEED,
    },
}


def _check_stored(spec: RunSpec) -> None:
    """Values a stored run may not hold even though their types fit (a hand-edited run.json)."""
    for group, ranges in _RANGES.items():
        values = getattr(spec, group)
        for name, (low, high) in ranges.items():
            value = getattr(values, name)
            if (low is not None and value < low) or (high is not None and value > high):
                allowed = f"at least {low:g}" if high is None else f"in [{low:g}, {high:g}]"
                raise _Invalid(f"config.{group}.{name} must be {allowed}, got {value!r}")
    if spec.protocol.max_seconds is not None and spec.protocol.max_seconds <= 0:
        raise _Invalid(f"config.protocol.max_seconds must be > 0, got {spec.protocol.max_seconds}")
    if spec.protocol.start_method not in START_METHODS:
        raise _Invalid(
            f"config.protocol.start_method must be one of {', '.join(START_METHODS)}, "
            f"got {spec.protocol.start_method!r}"
        )
    if spec.protocol.placement not in PLACEMENTS:
        raise _Invalid(
            f"config.protocol.placement must be one of {', '.join(PLACEMENTS)}, "
            f"got {spec.protocol.placement!r}"
        )
    if not spec.configurations:
        raise _Invalid("config.configurations is empty")
    names = [c.name for c in spec.configurations]
    if len(set(names)) != len(names):
        raise _Invalid("config.configurations names a configuration twice")
    _check_source(spec.source)
    _check_serving(spec.serving)
    # Names only, and only the suite's list: a configuration whose transform cannot be built
    # fails in its own worker, recorded, while the others are measured.
    known = transform_classes()
    for transform in spec.transforms:
        if transform.name not in known:
            raise _Invalid(
                f"config.transforms names an unknown transform {transform.name!r}; known: "
                f"{', '.join(sorted(known))}"
            )


def _check_serving(serving: ServingSpec) -> None:
    if serving.engine not in ENGINES:
        raise _Invalid(
            f"config.serving.engine must be one of {', '.join(ENGINES)}, got {serving.engine!r}"
        )
    sizes = serving.batch_sizes
    if not sizes or any(size < 1 for size in sizes) or len(set(sizes)) != len(sizes):
        raise _Invalid(
            f"config.serving.batch_sizes must be distinct sizes of at least 1, got {list(sizes)}"
        )


def _check_source(source: ModelSource) -> None:
    if (source.preset is None) == (source.model_path is None):
        raise _Invalid("config.source must name exactly one of preset and model_path")
    if source.preset is not None:
        try:
            get_preset(source.preset)
        except CompoundError as error:
            raise _Invalid(f"config.source.preset: {error}") from None
    if source.dtype not in DTYPES:
        raise _Invalid(
            f"config.source.dtype must be one of {', '.join(DTYPES)}, got {source.dtype!r}"
        )
    device = source.device
    if device != "cpu" and not (device == "cuda" or device.removeprefix("cuda:").isdigit()):
        raise _Invalid(f"config.source.device must be cpu, cuda or cuda:N, got {device!r}")


def _build(cls: type, data: Any, path: str) -> Any:
    """Dataclass `cls` from a dict: no unknown field; only fields with a default may be left out."""
    if not isinstance(data, dict):
        raise _Invalid(f"{path} must be an object, got {_shown(data)}")
    known = {f.name: f for f in fields(cls)}
    for name in data:
        if name not in known:
            raise _Invalid(f"{path}.{name} is not a field of {cls.__name__}")
    for name, spec in known.items():
        if name not in data and spec.default is MISSING and spec.default_factory is MISSING:
            raise _Invalid(f"{path}.{name} is missing")
    hints = get_type_hints(cls)
    return cls(
        **{name: _value(hints[name], value, f"{path}.{name}") for name, value in data.items()}
    )


def _value(hint: Any, value: Any, path: str) -> Any:
    """`value` checked against the annotation `hint`; lists stand for tuples (JSON has none)."""
    origin = get_origin(hint)
    if is_dataclass(hint):
        return _build(hint, value, path)
    if origin in (Union, types.UnionType):
        for arm in get_args(hint):
            try:
                return _value(arm, value, path)
            except _Invalid:
                pass
        raise _Invalid(f"{path} must be {_named(hint)}, got {_shown(value)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Invalid(f"{path} must be a list, got {_shown(value)}")
        item = get_args(hint)[0]
        return tuple(_value(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Invalid(f"{path} must be an object, got {_shown(value)}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise _Invalid(f"{path} must be a finite number, got {value}")
        return float(value)
    if hint is type(None) and value is None:
        return None
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise _Invalid(f"{path} must be {_named(hint)}, got {_shown(value)}")


def _named(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_named(arm) for arm in get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
