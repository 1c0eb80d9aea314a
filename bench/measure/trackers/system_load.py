"""System load windows: how much CPU other processes took while a block was timed.

Usage (inside the worker process that serves the block)::

    meter = LoadMeter()
    with meter.window() as w:
        run_block()
    samples = w.samples(config, block)

Like pyperf's system checks, the harness has to know when the machine was busy: a block
timed while other jobs shared our cores is slower for reasons that have nothing to do with
the configuration, and a calibration or comparison built on such blocks is meaningless.

A window records, between its start and its end:

- the CPU time spent by every process on our CPUs (from the `/proc/stat` counters:
  user + nice + system + irq + softirq + steal; idle and iowait are not work),
- this process's own CPU time (`time.process_time()`: all its threads, user + system),
- their difference, `other_cpu_s`: what everyone else took, and `other_cpu_fraction`:
  that as a share of the CPU time our CPUs offered (wall × `len(os.sched_getaffinity(0))`),
- the 1-minute load average and the cores' current frequency at both ends.

`/proc/stat` counts in clock ticks (1 / `SC_CLK_TCK` s, 10 ms on Linux) and the kernel
samples it at scheduler ticks, while `process_time()` is exact, so `other_cpu_s` is noisy
by a few ticks: it is clamped at 0 (the unclamped figure is kept) and the tick is recorded.
Where `/proc/stat` cannot be read (not Linux), the CPU figures are NaN and the window
carries a `warning`; it never raises.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.busy import BUSY_OTHER_CPU_FRACTION, is_busy
from core.samples import Sample

# Below this many clock ticks of CPU time at the busy threshold (wall × cpus × threshold),
# the tick resolution of /proc/stat is too coarse for the rule, and the window warns.
MIN_TICKS_AT_THRESHOLD = 10

# Fields of a /proc/stat cpu line, in order: user nice system idle iowait irq softirq steal
# guest guest_nice. Guest time is already inside user and nice, so it is not added again.
# Steal is time the hypervisor gave our virtual CPUs to someone else: contention too.
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
_STEAL_FIELD = 7

PROC_STAT = Path("/proc/stat")
CPU_SYSFS = Path("/sys/devices/system/cpu")


# --- readers ---------------------------------------------------------------------------


def read_proc_stat() -> str:
    return PROC_STAT.read_text()


def parse_cpu_lines(text: str) -> dict[str, list[int]]:
    """`{"cpu": [...], "cpu0": [...], ...}`: the counters of every cpu line of /proc/stat."""
    lines = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("cpu"):
            lines[parts[0]] = [int(value) for value in parts[1:]]
    if "cpu" not in lines:
        raise ValueError("no aggregate 'cpu' line")
    return lines


def _field(counters: list[int], index: int) -> int:
    return counters[index] if index < len(counters) else 0  # old kernels lack steal


def busy_ticks(counters: list[int]) -> int:
    """user + nice + system + irq + softirq + steal of one cpu line, in clock ticks."""
    return sum(_field(counters, i) for i in _BUSY_FIELDS)


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def _clock_tick_s() -> float:
    try:
        return 1.0 / os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return math.nan


def _load_1m() -> float:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # Windows, or unreadable
        return math.nan


def read_cpu_mhz(cpus: set[int], root: Path = CPU_SYSFS) -> list[float] | None:
    """Current frequency (MHz) of each of `cpus` from cpufreq, or None where unreadable.

    Virtual machines and containers often have no cpufreq directory at all.
    """
    mhz = []
    for cpu in sorted(cpus):
        try:
            khz = int((root / f"cpu{cpu}" / "cpufreq" / "scaling_cur_freq").read_text())
        except (OSError, ValueError):
            return None
        mhz.append(khz / 1000.0)
    return mhz or None


# --- the window ------------------------------------------------------------------------


@dataclass
class LoadWindow:
    """The result of one `meter.window()`: filled in when the `with` block exits."""

    wall_s: float = math.nan
    load_1m_start: float = math.nan
    load_1m_end: float = math.nan
    total_cpu_s: float = math.nan  # every process, on our CPUs
    own_cpu_s: float = math.nan  # this process, all threads
    other_cpu_s: float = math.nan  # total - own, clamped at 0
    other_cpu_s_unclamped: float = math.nan
    steal_s: float = math.nan  # part of total_cpu_s: the hypervisor ran someone else
    other_cpu_fraction: float = math.nan
    cpus: int = 0
    cpu_scope: str = ""
    clock_tick_s: float = math.nan
    cpu_mhz_start: list[float] | None = None
    cpu_mhz_end: list[float] | None = None
    warning: str | None = None
    t_start: float = 0.0
    t_end: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def busy(self) -> bool:
        return is_busy(self.other_cpu_fraction)

    def samples(self, config: str, block: int) -> list[Sample]:
        """Two measured samples, "other_cpu_s" (s) and "load_avg_1m" (load, at the end)."""
        extra = {
            "other_cpu_fraction": self.other_cpu_fraction,
            "other_cpu_s_unclamped": self.other_cpu_s_unclamped,
            "total_cpu_s": self.total_cpu_s,
            "own_cpu_s": self.own_cpu_s,
            "steal_s": self.steal_s,
            "window_s": self.wall_s,
            "load_1m_start": self.load_1m_start,
            "load_1m_end": self.load_1m_end,
            "cpus": self.cpus,
            "cpu_scope": self.cpu_scope,
            "clock_tick_s": self.clock_tick_s,
            "cpu_mhz_start": self.cpu_mhz_start,
            "cpu_mhz_end": self.cpu_mhz_end,
            "busy": self.busy,
            "busy_threshold": BUSY_OTHER_CPU_FRACTION,
            "warning": self.warning,
            **self.extra,
        }
        figures = {
            "other_cpu_s": (self.other_cpu_s, "s"),
            "load_avg_1m": (self.load_1m_end, "load"),
        }
        return [
            Sample(
                config=config,
                block=block,
                metric=metric,
                value=value,
                unit=unit,
                module="total",
                source="measured",
                t_start=self.t_start,
                t_end=self.t_end,
                extra=dict(extra),
            )
            for metric, (value, unit) in figures.items()
        ]


class LoadMeter:
    """Opens a `LoadWindow` around a block of work; every reader can be replaced for tests.

    Use it in the process that does the work: "own" CPU time is that process's, and
    everything else on our CPUs, the harness's parent and idle workers included, is
    "other". `time.process_time()` (CLOCK_PROCESS_CPUTIME_ID: user + system of every
    thread, so torch's intra-op threads count as ours) is exact and covers only this
    process. RUSAGE_CHILDREN is not added: the worker starts no children that do work,
    and it only counts children that have exited and been waited for, so it would charge a
    child's whole life to the window it happened to be reaped in. A child that did work
    during the block would therefore count as "other" load, which it is for the timing.
    """

    def __init__(
        self,
        read_stat: Callable[[], str] = read_proc_stat,
        load_1m: Callable[[], float] = _load_1m,
        own_cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.perf_counter,
        affinity: Callable[[], set[int]] = _affinity,
        clock_tick_s: float | None = None,
        cpufreq: Callable[[set[int]], list[float] | None] = read_cpu_mhz,
    ) -> None:
        self.read_stat = read_stat
        self.load_1m = load_1m
        self.own_cpu = own_cpu
        self.clock = clock
        self.affinity = affinity
        self.clock_tick_s = _clock_tick_s() if clock_tick_s is None else clock_tick_s
        self.cpufreq = cpufreq

    def _stat(self, warnings: list[str]) -> dict[str, list[int]] | None:
        try:
            return parse_cpu_lines(self.read_stat())
        except (OSError, ValueError) as error:
            warnings.append(
                f"/proc/stat unreadable ({type(error).__name__}: {error}); CPU figures are NaN"
            )
            return None

    def _cpu_freq(self, cpus: set[int]) -> list[float] | None:
        try:
            return self.cpufreq(cpus)
        except Exception:  # a frequency is a nicety; never fail a block over it
            return None

    @contextmanager
    def window(self) -> Iterator[LoadWindow]:
        """Measure the load on our CPUs during the enclosed block; read it after exit."""
        w = LoadWindow(clock_tick_s=self.clock_tick_s)
        warnings: list[str] = []
        cpu_set = self.affinity()
        w.cpus = len(cpu_set)
        w.load_1m_start = self.load_1m()
        w.cpu_mhz_start = self._cpu_freq(cpu_set)
        w.t_start = time.time()
        stat_start = self._stat(warnings)
        own_start = self.own_cpu()
        t0 = self.clock()
        yield w
        w.wall_s = self.clock() - t0
        own_end = self.own_cpu()
        stat_end = self._stat(warnings) if stat_start is not None else None
        w.t_end = time.time()
        w.load_1m_end = self.load_1m()
        w.cpu_mhz_end = self._cpu_freq(cpu_set)
        if stat_start is not None and stat_end is not None:
            self._fill_cpu(w, stat_start, stat_end, own_end - own_start, cpu_set, warnings)
        w.warning = "; ".join(warnings) or None

    def _fill_cpu(
        self,
        w: LoadWindow,
        start: dict[str, list[int]],
        end: dict[str, list[int]],
        own_cpu_s: float,
        cpu_set: set[int],
        warnings: list[str],
    ) -> None:
        # Only our CPUs compete with us: when the affinity mask is a strict subset of the
        # machine's CPUs, sum their own lines instead of the whole-machine aggregate.
        all_cpus = {name for name in end if name != "cpu"}
        ours = {f"cpu{i}" for i in cpu_set}
        if ours and ours != all_cpus and ours <= (all_cpus & set(start)):
            names = sorted(ours, key=lambda name: int(name[3:]))
            w.cpu_scope = f"{len(names)} of {len(all_cpus)} cpus: {sorted(cpu_set)}"
        else:
            names = ["cpu"]
            w.cpu_scope = f"all {len(all_cpus)} cpus (aggregate line)"
            if ours != all_cpus:
                warnings.append(
                    f"affinity cpus {sorted(cpu_set)} do not match /proc/stat's cpu lines; "
                    "counted the whole machine"
                )
        tick = self.clock_tick_s
        total_ticks = sum(busy_ticks(end[n]) - busy_ticks(start[n]) for n in names)
        steal_ticks = sum(
            _field(end[n], _STEAL_FIELD) - _field(start[n], _STEAL_FIELD) for n in names
        )
        w.total_cpu_s = total_ticks * tick
        w.steal_s = steal_ticks * tick
        w.own_cpu_s = own_cpu_s
        w.other_cpu_s_unclamped = w.total_cpu_s - own_cpu_s
        w.other_cpu_s = max(0.0, w.other_cpu_s_unclamped)
        capacity = w.wall_s * w.cpus
        w.other_cpu_fraction = w.other_cpu_s / capacity if capacity > 0 else math.nan
        if capacity * BUSY_OTHER_CPU_FRACTION < MIN_TICKS_AT_THRESHOLD * tick:
            warnings.append(
                f"window of {w.wall_s:.3g} s on {w.cpus} cpus is short for /proc/stat's "
                f"{tick:g} s ticks; other_cpu_fraction is coarse"
            )
