"""Energy windows: measured (NVML, RAPL) or estimated (CPU time × watts), always labelled.

Usage::

    meter = select_energy_meter(device, watts_per_core=DEFAULT_WATTS_PER_CORE)
    with meter.window() as w:
        run_block()
    samples = w.samples(config, block)

Following Zeus, the device is synchronised at both ends of a window (so queued GPU
work lands inside it), and a measured reading of zero is a warning with a NaN
value, never a silent 0. Every window records what its figure covers (`scope`):
a GPU, the CPU packages, or this process's CPU time, so the analysis never mixes
them up.

Short NVML windows are not measurements. NVML's total-energy counter advances in
steps about every 100 ms (`NVML_COUNTER_PERIOD_S`), so a window's delta is a whole
number of steps: 0.5 s blocks on an H100 read 47.6, 59.4, 71.3 and 83.1 J (steps of
≈ 11.9 J), and two configurations drawing the same power can "differ" by a whole
step (~17% of a 0.5 s window) only because their windows sit differently against the
ticks. A window shorter than `min_window_s` (1 s for NVML) therefore has value NaN,
never a number: `extra["excluded"]` says why, `extra["raw_joules"]` keeps the counter
delta for diagnosis, and the paired analysis (which drops NaN rounds) never compares it.

Every NVML window also records `extra["quantisation_bound"]` = 2 × period / window_s
(`quantisation_bound()`): the relative error two counter steps can cause, assuming
constant power P. Each step is P × period joules and the window's true energy is
P × window_s, so one step of error at each end of the window (the counter's phase at
the start and at the end) is at most 2 × period / window_s of the figure: ≤ 20% at
1 s, ≤ 2% at 10 s. With an ideal counter read between its ticks the two ends partly
cancel and the error stays under one step (period / window_s); the factor 2 leaves room
for a counter whose ticks jitter. It bounds quantisation only: power that changes
within a step, or a window that is not the block's, is not covered.
RAPL (updated every ~1 ms) and the CPU-time estimate are not subject to the 1 s rule.
"""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.measure.trackers.nvml import nvml_handle
from core.samples import Sample, Source

# Watts drawn per CPU core kept busy, for the estimate used when RAPL is unreadable.
# A CPU's TDP divided by its cores, for a common cloud server part: the Intel Xeon
# Gold 6248 has a 150 W TDP over 20 cores = 7.5 W per busy core. Server parts span
# roughly 4-12 W per core (AMD EPYC 7763: 280 W / 64 cores = 4.4 W). It is an
# order-of-magnitude figure: it ignores idle, uncore and DRAM power, and SMT
# siblings each count a full core. The CLI lets the user set their own value.
DEFAULT_WATTS_PER_CORE = 7.5

# NVML's total-energy counter updates about every 100 ms; windows shorter than ten
# updates are excluded (value NaN), as the measurement guide requires windows ≥ 1 s.
NVML_COUNTER_PERIOD_S = 0.1
NVML_MIN_WINDOW_S = 1.0
# Idle power is read over a window long enough that two counter steps are ≤ 7% of it.
IDLE_WINDOW_S = 3.0
_PACKAGE_DIR = re.compile(r"^intel-rapl:\d+$")


def quantisation_bound(window_s: float, period_s: float) -> float:
    """Largest relative error of a counter delta that two counter steps can cause.

    2 × period_s / window_s, assuming constant power (see the module docstring);
    infinite for a window of no length.
    """
    if not window_s > 0:
        return math.inf
    return 2.0 * period_s / window_s


@dataclass
class EnergyWindow:
    """The result of one `meter.window()`: filled in when the `with` block exits."""

    meter: str
    source: Source
    method: str
    scope: str
    joules: float = math.nan
    seconds: float = math.nan
    warning: str | None = None
    t_start: float = 0.0
    t_end: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def samples(self, config: str, block: int) -> list[Sample]:
        """One "energy_j" Sample, labelled with the meter's source and method."""
        extra = {
            "meter": self.meter,
            "method": self.method,
            "scope": self.scope,
            "warning": self.warning,
            "window_s": self.seconds,
            **self.extra,
        }
        return [
            Sample(
                config=config,
                block=block,
                metric="energy_j",
                value=self.joules,
                unit="J",
                source=self.source,
                t_start=self.t_start,
                t_end=self.t_end,
                extra=extra,
            )
        ]


class EnergyMeter(ABC):
    """A cumulative energy reading opened and closed around a block of work.

    Subclasses provide `_snapshot()` (a raw reading) and `_measure(start, end)`
    (joules between two readings, plus any extra fields). The base class owns the
    timing, device sync, and the rules about short windows and zero readings:

    - a window shorter than `min_window_s` has value NaN, with the reason in
      `extra["excluded"]` (and in the warning) and the delta in `extra["raw_joules"]`;
    - a measured delta of zero has value NaN and a warning;
    - a meter whose counter updates in coarse steps (`counter_period_s` set) records
      `raw_joules`, `counter_period_s`, `min_window_s` and `quantisation_bound` for
      every window.
    """

    name: str
    source: Source
    method: str
    scope: str
    min_window_s: float = 0.0
    counter_period_s: float | None = None
    short_window_reason = "window {window_s:.2f} s < {min_window_s:.1f} s; badly quantised"

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device

    @abstractmethod
    def _snapshot(self) -> Any:
        """A raw reading of the cumulative counter, taken after the device sync."""

    @abstractmethod
    def _measure(self, start: Any, end: Any) -> tuple[float, dict[str, Any]]:
        """Joules between two snapshots, and extra fields for the Sample."""

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)

    @contextmanager
    def window(self) -> Iterator[EnergyWindow]:
        """Measure the energy of the enclosed block; read the result after it exits."""
        w = EnergyWindow(meter=self.name, source=self.source, method=self.method, scope=self.scope)
        self._sync()
        w.t_start = time.time()
        t0 = time.perf_counter()
        start = self._snapshot()
        yield w
        self._sync()
        end = self._snapshot()
        w.seconds = time.perf_counter() - t0
        w.t_end = time.time()
        raw_joules, w.extra = self._measure(start, end)
        joules = raw_joules
        warnings = []
        if self.counter_period_s is not None:
            w.extra["raw_joules"] = raw_joules
            w.extra["counter_period_s"] = self.counter_period_s
            w.extra["min_window_s"] = self.min_window_s
            w.extra["quantisation_bound"] = quantisation_bound(w.seconds, self.counter_period_s)
        if w.seconds < self.min_window_s:
            reason = self.short_window_reason.format(
                window_s=w.seconds, min_window_s=self.min_window_s
            )
            w.extra["excluded"] = reason
            w.extra["raw_joules"] = raw_joules
            warnings.append(f"{reason}; value set to NaN (excluded from comparisons)")
            joules = math.nan
        if self.source == "measured" and raw_joules == 0:
            warnings.append("energy counter did not advance (zero delta); value set to NaN")
            joules = math.nan
        w.joules = joules
        w.warning = "; ".join(warnings) or None


def per_request_energy(
    windows: list[Sample], requests: int, tokens: int, idle_watts: float | None = None
) -> list[Sample]:
    """Each energy window divided per request served and per token generated, with the same
    label; with the device's idle power (`measure_idle_power`), also the energy above idle:
    the window's joules less idle watts × its seconds (what serving added to standing power)."""
    derived = []
    for window in windows:
        figures = {
            "energy_per_request_j": (window.value / requests, "J/request"),
            "energy_per_token_j": (window.value / tokens, "J/token"),
        }
        if idle_watts is not None:
            above = window.value - idle_watts * float(window.extra["window_s"])
            figures["energy_above_idle_j"] = (above, "J")
            figures["energy_above_idle_per_token_j"] = (above / tokens, "J/token")
        for metric, (value, unit) in figures.items():
            derived.append(
                Sample(
                    config=window.config,
                    block=window.block,
                    metric=metric,
                    value=value,
                    unit=unit,
                    source=window.source,
                    t_start=window.t_start,
                    t_end=window.t_end,
                    extra={
                        "meter": window.extra.get("meter"),
                        "requests": requests,
                        "tokens": tokens,
                        "idle_watts": idle_watts,
                    },
                )
            )
    return derived


def measure_idle_power(meter: EnergyMeter, seconds: float = IDLE_WINDOW_S) -> dict[str, Any] | None:
    """The device's power while nothing runs, from one window of the run's own meter, taken
    once per run before any worker starts; None when the meter only estimates (an estimate
    from busy CPU time has no idle power to measure)."""
    if meter.source != "measured":
        return None
    with meter.window() as window:
        time.sleep(seconds)
    if not math.isfinite(window.joules):
        return None
    return {
        "watts": window.joules / window.seconds,
        "seconds": window.seconds,
        "meter": meter.name,
        "method": f"{meter.method} over {window.seconds:.1f} s with no work queued",
        "source": "measured",
        "quantisation_bound": window.extra.get("quantisation_bound"),
    }


# --- NVML --------------------------------------------------------------------------


def gpu_state(handle: Any) -> dict[str, float]:
    """SM clock (MHz) and GPU temperature (°C) now: recorded at both ends of a block."""
    import pynvml

    return {
        "sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
        "temperature_c": float(
            pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        ),
    }


def state_drift(
    start: dict[str, float],
    end: dict[str, float],
    clock_tolerance: float = 0.05,
    temperature_tolerance_c: float = 5.0,
) -> dict[str, Any]:
    """Change of clock and temperature over a block, and whether it exceeds tolerance.

    Heat lowers clocks and raises power, so a block whose SM clock moved by more
    than 5% or whose temperature rose by more than 5 °C is flagged as drifted.
    """
    clock_change = (end["sm_clock_mhz"] - start["sm_clock_mhz"]) / start["sm_clock_mhz"]
    temperature_change = end["temperature_c"] - start["temperature_c"]
    return {
        "sm_clock_mhz_start": start["sm_clock_mhz"],
        "sm_clock_mhz_end": end["sm_clock_mhz"],
        "temperature_c_start": start["temperature_c"],
        "temperature_c_end": end["temperature_c"],
        "sm_clock_rel_change": clock_change,
        "temperature_c_change": temperature_change,
        "drifted": abs(clock_change) > clock_tolerance
        or abs(temperature_change) > temperature_tolerance_c,
    }


class NvmlEnergyMeter(EnergyMeter):
    """Deltas of NVML's total-energy counter (millijoules, Volta and newer).

    The counter updates about every 100 ms, so windows shorter than `min_window_s`
    (1 s) give NaN with the reason in `extra["excluded"]`; every window records its
    `quantisation_bound`. Lowering `min_window_s` is for tests of the delta arithmetic
    only: the measurement guide forbids comparing quantised windows.
    """

    name = "nvml"
    source: Source = "measured"
    method = "NVML nvmlDeviceGetTotalEnergyConsumption delta (mJ counter)"
    scope = "gpu"
    counter_period_s = NVML_COUNTER_PERIOD_S
    short_window_reason = (
        "window {window_s:.2f} s < {min_window_s:.1f} s: NVML's counter updates every "
        "~100 ms, so shorter windows are quantised"
    )

    def __init__(self, device_index: int = 0, min_window_s: float = NVML_MIN_WINDOW_S) -> None:
        super().__init__(torch.device("cuda", device_index))
        self.min_window_s = min_window_s
        self.handle = nvml_handle(device_index)

    def _snapshot(self) -> tuple[int, dict[str, float] | None]:
        import pynvml

        millijoules = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        try:
            state = gpu_state(self.handle)
        except pynvml.NVMLError:
            state = None
        return millijoules, state

    def _measure(self, start: Any, end: Any) -> tuple[float, dict[str, Any]]:
        (mj_start, state_start), (mj_end, state_end) = start, end
        extra = {}
        if state_start is not None and state_end is not None:
            extra = state_drift(state_start, state_end)
        return (mj_end - mj_start) / 1000.0, extra


# --- RAPL --------------------------------------------------------------------------


def _rapl_packages(root: Path) -> list[Path]:
    """Top-level package domains only: sub-domains (core, uncore, dram) sit inside
    the package figure, and psys spans the whole platform, so either would double count."""
    if not root.is_dir():
        return []
    packages = []
    for path in sorted(root.iterdir()):
        if not _PACKAGE_DIR.match(path.name):
            continue
        name_file = path / "name"
        if name_file.exists() and not name_file.read_text().strip().startswith("package"):
            continue
        packages.append(path)
    return packages


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


class RaplEnergyMeter(EnergyMeter):
    """Intel/AMD RAPL package energy from the Linux powercap sysfs tree (microjoules)."""

    name = "rapl"
    source: Source = "measured"
    method = "RAPL powercap package energy_uj delta, summed over packages"
    scope = "cpu packages (whole machine, not just this process)"

    def __init__(
        self, root: str | Path = "/sys/class/powercap", device: torch.device | None = None
    ) -> None:
        super().__init__(device)
        self.packages = _rapl_packages(Path(root))
        if not self.packages:
            raise FileNotFoundError(f"no RAPL package domains under {root}")
        self.max_range_uj = [_read_int(p / "max_energy_range_uj") for p in self.packages]

    @staticmethod
    def available(root: str | Path = "/sys/class/powercap") -> bool:
        """True when every package counter is readable (often root-only; absent in VMs)."""
        packages = _rapl_packages(Path(root))
        try:
            for path in packages:
                _read_int(path / "energy_uj")
                _read_int(path / "max_energy_range_uj")
        except (OSError, ValueError):
            return False
        return bool(packages)

    def _snapshot(self) -> list[int]:
        return [_read_int(p / "energy_uj") for p in self.packages]

    def _measure(self, start: Any, end: Any) -> tuple[float, dict[str, Any]]:
        total_uj = 0
        wraps = 0
        for before, after, max_range in zip(start, end, self.max_range_uj, strict=True):
            if after < before:
                after += max_range
                wraps += 1
            total_uj += after - before
        return total_uj / 1e6, {"packages": [p.name for p in self.packages], "wraps": wraps}


# --- Estimate ----------------------------------------------------------------------


class EstimatedCpuEnergyMeter(EnergyMeter):
    """This process's CPU time (user + system, all threads) × a fixed power per busy core.

    Only the process's own CPU time counts, so other load on a shared machine does
    not inflate the figure; idle, uncore and DRAM power are not included.
    """

    name = "cpu-time-estimate"
    source: Source = "estimated"
    scope = "cpu (this process's CPU time)"

    def __init__(
        self, watts_per_core: float = DEFAULT_WATTS_PER_CORE, device: torch.device | None = None
    ) -> None:
        if watts_per_core <= 0:
            raise ValueError(f"watts_per_core must be positive, got {watts_per_core}")
        super().__init__(device)
        self.watts_per_core = watts_per_core
        self.method = f"CPU time × {watts_per_core:g} W per busy core (estimated; no RAPL)"

    def _snapshot(self) -> float:
        return time.process_time()

    def _measure(self, start: Any, end: Any) -> tuple[float, dict[str, Any]]:
        cpu_seconds = end - start
        return cpu_seconds * self.watts_per_core, {
            "cpu_seconds": cpu_seconds,
            "watts_per_core": self.watts_per_core,
        }


def select_energy_meter(
    device: torch.device,
    watts_per_core: float = DEFAULT_WATTS_PER_CORE,
    rapl_root: str | Path = "/sys/class/powercap",
) -> EnergyMeter:
    """NVML on CUDA when it works, else RAPL when readable, else the labelled estimate.

    Never raises because NVML or RAPL is missing: that only moves down the list.
    """
    if device.type == "cuda":
        try:
            meter = NvmlEnergyMeter(device.index or 0)
            meter._snapshot()  # pre-Volta GPUs raise NotSupported here
            return meter
        except Exception:  # any NVML failure (missing library, no GPU, NotSupported)
            pass
    if RaplEnergyMeter.available(rapl_root):
        return RaplEnergyMeter(rapl_root, device=device)
    return EstimatedCpuEnergyMeter(watts_per_core, device=device)
