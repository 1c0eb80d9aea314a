"""Tests for the system-load tracker: synthetic /proc/stat readings, then one real busy loop."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest

from bench.judge.busy import busy_summary
from bench.measure.trackers.system_load import (
    LoadMeter,
    busy_ticks,
    parse_cpu_lines,
    read_cpu_mhz,
)
from core.busy import BUSY_OTHER_CPU_FRACTION, BUSY_RUN_BLOCK_FRACTION, is_busy
from core.samples import Sample

TICK = 0.01  # 100 Hz, as on Linux


def stat_text(per_cpu: dict[int, list[int]]) -> str:
    """A /proc/stat with one line per cpu and the aggregate line summed from them."""
    aggregate = [sum(column) for column in zip(*per_cpu.values(), strict=True)]
    lines = ["cpu  " + " ".join(map(str, aggregate))]
    lines += [f"cpu{i} " + " ".join(map(str, c)) for i, c in per_cpu.items()]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 42", "btime 1700000000"]) + "\n"


def counters(user=0, nice=0, system=0, idle=0, iowait=0, irq=0, softirq=0, steal=0):
    return [user, nice, system, idle, iowait, irq, softirq, steal, 0, 0]


class Script:
    """Readers that return one scripted value per call, in order."""

    def __init__(self, *values):
        self.values = list(values)

    def __call__(self, *args):
        return self.values.pop(0)


def fake_meter(stats, own=(0.0, 0.0), wall=(0.0, 1.0), cpus=(0, 1), load=(1.0, 2.0), **kw):
    return LoadMeter(
        read_stat=Script(*stats),
        load_1m=Script(*load),
        own_cpu=Script(*own),
        clock=Script(*wall),
        affinity=lambda: set(cpus),
        clock_tick_s=TICK,
        cpufreq=kw.pop("cpufreq", lambda cpus: None),
        **kw,
    )


def run_window(meter):
    with meter.window() as w:
        pass
    return w


# --- synthetic windows -------------------------------------------------------------------


def test_known_jiffies_give_exact_other_cpu():
    start = stat_text({0: counters(user=1000, idle=5000), 1: counters(user=2000, idle=5000)})
    # over the window: 120 user + 10 nice + 30 system + 5 irq + 3 softirq + 2 steal = 170
    # ticks of work, plus idle and iowait that must not count.
    end = stat_text(
        {
            0: counters(user=1100, nice=10, system=20, idle=5080, iowait=40, irq=5, steal=2),
            1: counters(user=2020, system=10, idle=5150, iowait=7, softirq=3),
        }
    )
    meter = fake_meter([start, end], own=(3.0, 3.5), wall=(10.0, 12.0), load=(0.5, 2.25))
    w = run_window(meter)
    assert w.total_cpu_s == pytest.approx(1.70)
    assert w.own_cpu_s == pytest.approx(0.5)
    assert w.other_cpu_s == pytest.approx(1.20)
    assert w.steal_s == pytest.approx(0.02)
    assert w.wall_s == pytest.approx(2.0)
    assert w.cpus == 2
    assert w.other_cpu_fraction == pytest.approx(1.20 / (2.0 * 2))
    assert (w.load_1m_start, w.load_1m_end) == (0.5, 2.25)
    assert w.busy and w.warning is None
    assert w.clock_tick_s == TICK
    assert w.cpu_scope.startswith("all 2 cpus")


def test_only_our_cpus_count_when_pinned_to_a_subset():
    start = stat_text({i: counters(idle=100) for i in range(4)})
    # cpu2 and cpu3 are flat out (200 ticks each) but we may only run on cpu0 and cpu1.
    end = stat_text(
        {0: counters(user=10, idle=190), 1: counters(idle=200)}
        | {i: counters(user=200, idle=100) for i in (2, 3)}
    )
    w = run_window(fake_meter([start, end], wall=(0.0, 2.0), cpus=(0, 1)))
    assert w.total_cpu_s == pytest.approx(0.10)
    assert w.other_cpu_fraction == pytest.approx(0.10 / 4)
    assert not w.busy
    assert "2 of 4" in w.cpu_scope


def test_affinity_not_in_proc_stat_falls_back_to_the_whole_machine_with_a_warning():
    start = stat_text({0: counters(), 1: counters()})
    end = stat_text({0: counters(user=50), 1: counters(user=50)})
    w = run_window(fake_meter([start, end], cpus=(0, 5)))  # cpu5 has no line
    assert w.total_cpu_s == pytest.approx(1.0)
    assert w.cpu_scope.startswith("all 2 cpus")
    assert "counted the whole machine" in w.warning


def test_own_time_above_total_clamps_at_zero_and_keeps_the_raw_figure():
    start = stat_text({0: counters(user=100), 1: counters(user=100)})
    end = stat_text({0: counters(user=150), 1: counters(user=150)})  # 1.00 s in ticks
    w = run_window(fake_meter([start, end], own=(0.0, 1.004)))  # exact clock reads a bit more
    assert w.other_cpu_s == 0.0
    assert w.other_cpu_fraction == 0.0
    assert w.other_cpu_s_unclamped == pytest.approx(-0.004)
    assert not w.busy


def test_unreadable_proc_stat_gives_nan_and_a_warning():
    def missing():
        raise FileNotFoundError("/proc/stat")

    meter = LoadMeter(read_stat=missing, clock_tick_s=TICK)
    with meter.window() as w:
        pass
    for name in ("total_cpu_s", "own_cpu_s", "other_cpu_s", "other_cpu_fraction"):
        assert math.isnan(getattr(w, name)), name
    assert "/proc/stat unreadable" in w.warning
    assert not w.busy
    samples = w.samples("cfg", 3)
    assert math.isnan(samples[0].value)
    assert samples[0].extra["warning"] == w.warning


def test_garbled_proc_stat_and_missing_loadavg_do_not_crash():
    def no_loadavg():
        return math.nan  # what the default reader gives where os.getloadavg is missing

    meter = fake_meter(["intr 1 2\n", "intr 1 2\n"], load=(math.nan, math.nan))
    meter.load_1m = no_loadavg
    w = run_window(meter)
    assert math.isnan(w.other_cpu_s) and math.isnan(w.load_1m_end)
    assert "no aggregate 'cpu' line" in w.warning


def test_non_linux_os_module(monkeypatch):
    """No sched_getaffinity, getloadavg or /proc: the default readers fall back quietly."""
    from bench.measure.trackers import system_load

    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.delattr(os, "getloadavg")
    monkeypatch.setattr(system_load, "PROC_STAT", system_load.Path("/no/such/proc/stat"))
    with LoadMeter().window() as w:
        pass
    assert w.cpus == (os.cpu_count() or 1)
    assert math.isnan(w.load_1m_start) and math.isnan(w.other_cpu_fraction)
    assert "unreadable" in w.warning


def test_short_window_warns():
    start = stat_text({0: counters(), 1: counters()})
    w = run_window(fake_meter([start, start], wall=(0.0, 0.05)))
    assert w.other_cpu_fraction == 0.0
    assert "short" in w.warning


def test_samples_carry_both_metrics_and_the_extras():
    start = stat_text({0: counters(), 1: counters()})
    end = stat_text({0: counters(user=30), 1: counters(user=20)})
    freqs = Script([2000.0, 2100.0], [1900.0, 1950.0])
    w = run_window(fake_meter([start, end], own=(0.0, 0.1), load=(0.25, 1.5), cpufreq=freqs))
    samples = w.samples("cfg", 7)
    assert [(s.metric, s.unit) for s in samples] == [("other_cpu_s", "s"), ("load_avg_1m", "load")]
    other, load = samples
    assert all(isinstance(s, Sample) for s in samples)
    assert all(
        (s.config, s.block, s.module, s.source) == ("cfg", 7, "total", "measured") for s in samples
    )
    assert other.value == pytest.approx(0.4)
    assert load.value == 1.5
    extra = other.extra
    assert extra["other_cpu_fraction"] == pytest.approx(0.2)
    assert (extra["load_1m_start"], extra["load_1m_end"]) == (0.25, 1.5)
    assert extra["cpus"] == 2 and extra["clock_tick_s"] == TICK
    assert extra["cpu_mhz_start"] == [2000.0, 2100.0] and extra["cpu_mhz_end"] == [1900.0, 1950.0]
    assert extra["busy"] is True
    assert other.t_start <= other.t_end


def test_read_cpu_mhz(tmp_path):
    for cpu, khz in ((0, 2_400_000), (1, 3_100_500)):
        (tmp_path / f"cpu{cpu}" / "cpufreq").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "cpufreq" / "scaling_cur_freq").write_text(f"{khz}\n")
    assert read_cpu_mhz({0, 1}, tmp_path) == [2400.0, 3100.5]
    assert read_cpu_mhz({0, 2}, tmp_path) is None  # cpu2 has no cpufreq


def test_parse_and_busy_ticks():
    lines = parse_cpu_lines("cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 2 3 4\nintr 5\n")
    assert set(lines) == {"cpu", "cpu0"}
    assert busy_ticks(lines["cpu"]) == 1 + 2 + 3 + 6 + 7 + 8  # no idle, iowait or guest
    assert busy_ticks(lines["cpu0"]) == 1 + 2 + 3  # an old kernel's short line


# --- the rule ----------------------------------------------------------------------------


def test_is_busy_thresholds():
    assert BUSY_OTHER_CPU_FRACTION == 0.10
    assert not is_busy(0.0)
    assert not is_busy(0.10)  # more than 10%, not at
    assert is_busy(0.1001)
    assert is_busy(1.0)
    assert not is_busy(math.nan)
    assert is_busy(0.06, threshold=0.05)
    assert not is_busy(0.5, threshold=0.6)


# --- busy_summary ------------------------------------------------------------------------


def frame(fractions, loads=None, config="cfg"):
    """A tidy samples frame as RunStore.samples_frame() gives it, one window per fraction."""
    rows = []
    for block, fraction in enumerate(fractions):
        load = (loads or [1.0] * len(fractions))[block]
        extra = {"other_cpu_fraction": fraction, "load_1m_start": 0.5, "load_1m_end": load}
        for metric, value, unit in (("other_cpu_s", fraction, "s"), ("load_avg_1m", load, "load")):
            rows.append(Sample(config, block, metric, value, unit, extra=extra).to_dict())
        rows.append(Sample(config, block, "latency_e2e_s", 0.01, "s").to_dict())
    return pd.DataFrame.from_records(rows)


def test_busy_summary_counts_and_message():
    fractions = [0.35] * 40 + [0.05] * 80  # 40 of 120 busy
    s = busy_summary(frame(fractions, loads=[1.0] * 119 + [4.75]))
    assert (s["n_blocks"], s["n_busy"], s["n_unknown"]) == (120, 40, 0)
    assert s["busy_block_fraction"] == pytest.approx(1 / 3)
    assert s["median_other_cpu_fraction"] == pytest.approx(0.05)
    assert s["max_load_1m"] == 4.75
    assert s["busy"] is True
    assert s["message"] == (
        "machine busy: other processes took 35% of the CPUs in 40 of 120 blocks "
        "(median 5%); timings are suspect"
    )


def test_busy_summary_quiet_and_few_busy_runs_have_no_message():
    quiet = busy_summary(frame([0.01] * 50))
    assert quiet["n_busy"] == 0 and not quiet["busy"] and quiet["message"] == ""
    # 5 of 100 is exactly BUSY_RUN_BLOCK_FRACTION: not more than it, so not flagged
    assert BUSY_RUN_BLOCK_FRACTION == 0.05
    few = busy_summary(frame([0.5] * 5 + [0.0] * 95))
    assert few["n_busy"] == 5 and not few["busy"] and few["message"] == ""
    six = busy_summary(frame([0.5] * 6 + [0.0] * 94))
    assert six["busy"] and "6 of 100" in six["message"]


def test_busy_summary_unknown_blocks_and_empty_frames():
    # what the store gives back for a non-Linux run: NaN values written as null
    s = busy_summary(frame([None, None, 0.5]))
    assert (s["n_blocks"], s["n_unknown"], s["n_busy"]) == (3, 2, 1)
    empty = busy_summary(frame([]).reindex(columns=["config", "block", "metric", "extra", "value"]))
    assert empty["n_blocks"] == 0 and not empty["busy"] and empty["message"] == ""
    assert math.isnan(empty["median_other_cpu_fraction"]) and math.isnan(empty["max_load_1m"])


def test_busy_summary_from_windows_through_the_store(tmp_path):
    """Through the real store: NaN figures come back as null, the extras as dicts."""
    from bench.store import RunStore

    start = stat_text({0: counters(), 1: counters()})
    end = stat_text({0: counters(user=100), 1: counters(user=100)})
    busy = run_window(fake_meter([start, end], wall=(0.0, 1.0)))

    def missing():
        raise FileNotFoundError("/proc/stat")

    unknown = run_window(LoadMeter(read_stat=missing, clock_tick_s=TICK))
    assert unknown.warning and math.isnan(unknown.other_cpu_s)
    with RunStore.create(tmp_path, {}, {}, run_id="load") as store:
        store.append_block("cfg", 0, busy.samples("cfg", 0))
        store.append_block("cfg", 1, unknown.samples("cfg", 1))
        s = busy_summary(store.samples_frame())
    assert (s["n_blocks"], s["n_busy"], s["n_unknown"]) == (2, 1, 1)
    assert s["median_other_cpu_fraction"] == pytest.approx(1.0)
    assert s["busy"] and "1 of 2 blocks" in s["message"]


# --- the real machine --------------------------------------------------------------------

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
SPIN_S = 1.5


def measure_sleep(seconds: float):
    with LoadMeter().window() as w:
        time.sleep(seconds)
    return w


@needs_proc
def test_real_busy_loop_reads_busy_and_above_a_quiet_window():
    quiet = measure_sleep(SPIN_S)
    ours = os.sched_getaffinity(0)
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import sys\nprint('go', flush=True)\nwhile True: pass\n"],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: os.sched_setaffinity(0, ours),
    )
    try:
        assert spinner.stdout.readline().strip() == b"go"
        child = psutil.Process(spinner.pid)
        child_start = sum(child.cpu_times()[:2])
        busy = measure_sleep(SPIN_S)
        child_cpu_s = sum(child.cpu_times()[:2]) - child_start
    finally:
        spinner.kill()
        spinner.wait()
    assert busy.warning is None
    assert busy.own_cpu_s < 0.1  # we slept
    # the spinner's CPU time is other processes' time, whatever else the machine is doing
    assert busy.other_cpu_s >= 0.9 * child_cpu_s - 0.05
    assert busy.other_cpu_fraction > 0.2
    assert busy.busy
    if quiet.other_cpu_fraction > 0.9:
        pytest.skip(f"machine already saturated by others ({quiet.other_cpu_fraction:.0%})")
    assert quiet.other_cpu_fraction < busy.other_cpu_fraction
