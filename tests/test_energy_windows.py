"""NVML energy windows against a counter that steps every 100 ms, as the real one does.

NVML's total-energy counter (mJ) only advances about every 100 ms, so a window's delta
is a whole number of steps. On an H100, 0.5 s blocks read 47.6, 59.4, 71.3 and 83.1 J
(steps of ≈ 11.9 J, i.e. ~119 W), and one configuration showed a "+12.1%" energy saving
that was quantisation alone. Rule: NVML windows shorter than 1 s are NaN with the reason
recorded, so they never reach a comparison; longer windows carry their quantisation bound.

The fake pynvml reads a fake clock that also drives the meter (`energy.time` is replaced),
so a "1.5 s" window takes no real time.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.judge.analysis import block_values, comparisons
from bench.measure.trackers import energy
from bench.measure.trackers.cost import carbon_sample
from bench.measure.trackers.energy import (
    EnergyWindow,
    EstimatedCpuEnergyMeter,
    NvmlEnergyMeter,
    RaplEnergyMeter,
)
from bench.store import RunStore
from core.samples import Sample

PERIOD_NS = 100_000_000  # the fake counter's update period: 100 ms
PERIOD_S = PERIOD_NS / 1e9
H100_WATTS = 119.0  # 11.9 J per 100 ms step, as in the H100 readings


class Clock:
    """Stands in for the `time` module inside energy.py; moved forward by hand, in ns."""

    def __init__(self) -> None:
        self.ns = 1_000 * PERIOD_NS

    def advance(self, seconds: float) -> None:
        self.ns += round(seconds * 1e9)

    def to_phase(self, phase_s: float) -> None:
        """Move to `phase_s` after the start of the next counter tick."""
        self.ns = (self.ns // PERIOD_NS + 1) * PERIOD_NS + round(phase_s * 1e9)

    def perf_counter(self) -> float:
        return self.ns / 1e9

    def time(self) -> float:
        return 1.7e9 + self.ns / 1e9

    def process_time(self) -> float:
        return self.ns / 1e9

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)


class SteppingNvml(types.ModuleType):
    """Just enough pynvml: the energy counter is floor(t / 100 ms) × step, like NVML's."""

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, clock: Clock) -> None:
        super().__init__("pynvml")
        self.clock = clock
        self.watts = H100_WATTS
        self.offset_mj = 0

    @property
    def step_mj(self) -> int:
        return round(self.watts * PERIOD_S * 1000)

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"handle-{index}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        return self.offset_mj + (self.clock.ns // PERIOD_NS) * self.step_mj

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        return 1980

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 40


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(energy, "time", fake)
    return fake


@pytest.fixture
def nvml(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> SteppingNvml:
    fake = SteppingNvml(clock)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def measure(meter: NvmlEnergyMeter, clock: Clock, window_s: float, phase_s: float) -> EnergyWindow:
    """One window of `window_s` starting `phase_s` into a counter tick."""
    clock.to_phase(phase_s)
    with meter.window() as w:
        clock.advance(window_s)
    return w


def stored_frame(tmp_path: Path, blocks: dict[tuple[str, int], list[Sample]]) -> pd.DataFrame:
    """The tidy frame the analysis reads, written and read back through the run store."""
    with RunStore.create(tmp_path, {}, {}, run_id="energy-windows") as store:
        for (config, block), samples in blocks.items():
            store.append_block(config, block, samples)
        return store.samples_frame()


def block_samples(w: EnergyWindow, config: str, block: int) -> list[Sample]:
    """What a worker stores for one block: a latency figure, energy, and carbon from energy."""
    samples = [
        Sample(
            config, block, "latency_mean_s", w.seconds / 8, "s", t_start=w.t_start, t_end=w.t_end
        )
    ]
    energy_samples = w.samples(config, block)
    for sample in energy_samples:
        sample.extra["requests"] = 8
    samples += energy_samples
    samples += [carbon_sample(s) for s in energy_samples]
    return samples


def energy_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["metric"] == "energy_j"] if len(frame) else frame


# --- the fake counter ----------------------------------------------------------------


def test_fake_counter_steps_every_100ms(clock: Clock, nvml: SteppingNvml) -> None:
    clock.to_phase(0.0)
    first = nvml.nvmlDeviceGetTotalEnergyConsumption("h")
    clock.advance(0.099)
    assert nvml.nvmlDeviceGetTotalEnergyConsumption("h") == first  # no update within a tick
    clock.advance(0.001)
    assert nvml.nvmlDeviceGetTotalEnergyConsumption("h") - first == 11_900  # 11.9 J step


# --- short windows ---------------------------------------------------------------------


@pytest.mark.parametrize("window_s", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("phase_s", [0.0, 0.03, 0.07, 0.099])
def test_short_nvml_window_is_nan_with_reason_and_raw_delta(
    clock: Clock, nvml: SteppingNvml, window_s: float, phase_s: float
) -> None:
    meter = NvmlEnergyMeter(0)
    assert meter.min_window_s == 1.0
    w = measure(meter, clock, window_s, phase_s)
    assert w.seconds == pytest.approx(window_s)
    assert math.isnan(w.joules)
    reason = w.extra["excluded"]
    assert f"window {window_s:.2f} s < 1.0 s" in reason
    assert "100 ms" in reason and "quantised" in reason
    assert reason in w.warning
    # The counter delta stays visible for diagnosis: a whole number of steps.
    raw = w.extra["raw_joules"]
    assert raw > 0 and (raw / 11.9) == pytest.approx(round(raw / 11.9))
    assert abs(raw - H100_WATTS * window_s) <= 11.9 + 1e-9
    assert w.extra["quantisation_bound"] == pytest.approx(2 * 0.1 / window_s)
    (sample,) = w.samples("cfg", 0)
    assert math.isnan(sample.value)
    assert sample.extra["excluded"] == reason and sample.extra["raw_joules"] == raw


def test_short_window_is_nan_on_the_real_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fake clock: a real window of microseconds is excluded by the default 1 s rule."""
    fake = SteppingNvml(Clock())  # its counter only moves when the test bumps it
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with NvmlEnergyMeter(0).window() as w:
        fake.offset_mj += 40_000
    assert w.seconds < 1.0
    assert math.isnan(w.joules) and "excluded" in w.extra
    assert w.extra["raw_joules"] == pytest.approx(40.0)


# --- windows of 1 s and more ---------------------------------------------------------

LONG_WINDOWS = [1.03, 1.25, 1.37, 1.5, 2.0, 3.74, 10.0]


@pytest.mark.parametrize("window_s", LONG_WINDOWS)
def test_long_windows_are_within_the_recorded_bound(
    clock: Clock, nvml: SteppingNvml, window_s: float
) -> None:
    meter = NvmlEnergyMeter(0)
    truth = H100_WATTS * window_s
    ticks = window_s / 0.1
    steps_seen = set()
    for phase_s in np.linspace(0.0, 0.0999, 37):
        w = measure(meter, clock, window_s, float(phase_s))
        assert w.warning is None and "excluded" not in w.extra
        assert math.isfinite(w.joules) and w.joules == w.extra["raw_joules"]
        bound = w.extra["quantisation_bound"]
        assert bound == pytest.approx(2 * 0.1 / window_s)
        assert w.extra["counter_period_s"] == 0.1 and w.extra["min_window_s"] == 1.0
        (sample,) = w.samples("cfg", 0)
        assert sample.value == w.joules and sample.extra["quantisation_bound"] == bound
        assert abs(w.joules - truth) / truth <= bound
        steps_seen.add(round(w.joules / 11.9))
    # The fake really quantises: a window of 13.7 ticks reads 13 or 14 steps by phase.
    assert steps_seen == {math.floor(ticks + 1e-9), math.ceil(ticks - 1e-9)}


def test_one_second_is_the_boundary(clock: Clock, nvml: SteppingNvml) -> None:
    meter = NvmlEnergyMeter(0)
    assert math.isnan(measure(meter, clock, 0.999999, 0.05).joules)
    assert math.isfinite(measure(meter, clock, 1.000001, 0.05).joules)


def test_bound_shrinks_with_the_window() -> None:
    assert energy.quantisation_bound(1.0, 0.1) == pytest.approx(0.2)
    assert energy.quantisation_bound(10.0, 0.1) == pytest.approx(0.02)
    assert energy.quantisation_bound(0.0, 0.1) == math.inf


def test_zero_delta_over_a_long_window_is_still_nan_with_warning(
    clock: Clock, nvml: SteppingNvml
) -> None:
    nvml.watts = 0.0
    w = measure(NvmlEnergyMeter(0), clock, 1.5, 0.02)
    assert math.isnan(w.joules)
    assert "zero delta" in w.warning
    assert "excluded" not in w.extra and w.extra["raw_joules"] == 0.0


# --- from windows to comparisons -------------------------------------------------------


def test_original_failure_same_power_different_phase_cannot_be_compared(
    clock: Clock, nvml: SteppingNvml, tmp_path: Path
) -> None:
    """Same true power, same 0.505 s windows; only the phase against the ticks differs.

    baseline starts late in a tick (6 steps counted), fused early (5 steps): before the
    fix that was a ~17% "saving" of pure quantisation. Now both are NaN and energy does
    not enter the comparison at all.
    """
    meter = NvmlEnergyMeter(0)
    blocks = {}
    for block in range(8):
        for config, phase_s in (("baseline", 0.097), ("fused", 0.02)):
            w = measure(meter, clock, 0.505, phase_s)
            blocks[(config, block)] = block_samples(w, config, block)
    frame = stored_frame(tmp_path, blocks)
    # The comparison compares latency, and energy not at all.
    now = comparisons(frame, "baseline")
    assert "latency_mean_s" in set(now["metric"])
    assert "energy_j" not in set(now["metric"])
    rows = energy_rows(frame)
    assert len(rows) == 16 and rows["value"].isna().all()
    raw = rows.assign(value=[e["raw_joules"] for e in rows["extra"]])
    by_config = raw.groupby("config")["value"]
    assert set(by_config.min()) == set(by_config.max())  # one reading per configuration
    assert by_config.first()["baseline"] - by_config.first()["fused"] == pytest.approx(11.9)

    # What the comparison said when the raw delta was the value: a saving from nothing.
    old = comparisons(pd.concat([frame[frame["metric"] != "energy_j"], raw]), "baseline")
    old_energy = old[old["metric"] == "energy_j"].iloc[0]
    assert old_energy["delta"] == pytest.approx(1 - 5 / 6)  # ~+16.7%, true saving 0

    assert block_values(frame, "energy_j").isna().all().all()
    assert frame[frame["metric"] == "co2_g"]["value"].isna().all()


def test_comparison_uses_only_windows_of_at_least_one_second(
    clock: Clock, nvml: SteppingNvml, tmp_path: Path
) -> None:
    """Even rounds 0.55 s, odd rounds 1.37 s; fused draws 100 W against baseline's 119 W.

    In the short rounds baseline starts late in a tick and fused early, so their raw
    deltas would claim a 30% saving (71.4 J against 50 J) instead of the true 16%.
    """
    rng = np.random.default_rng(7)
    meter = NvmlEnergyMeter(0)
    blocks = {}
    long_raw: dict[str, dict[int, float]] = {"baseline": {}, "fused": {}}
    all_raw: dict[str, dict[int, float]] = {"baseline": {}, "fused": {}}
    for block in range(8):
        short = block % 2 == 0
        window_s = 0.55 if short else 1.37
        for config, watts, short_phase_s in (("baseline", 119.0, 0.07), ("fused", 100.0, 0.01)):
            nvml.watts = watts
            phase_s = short_phase_s if short else float(rng.uniform(0, 0.1))
            w = measure(meter, clock, window_s, phase_s)
            blocks[(config, block)] = block_samples(w, config, block)
            all_raw[config][block] = w.extra["raw_joules"]
            if not short:
                long_raw[config][block] = w.extra["raw_joules"]
                assert math.isfinite(w.joules)
            else:
                assert math.isnan(w.joules)
    frame = stored_frame(tmp_path, blocks)
    (row,) = comparisons(frame, "baseline").query("metric == 'energy_j'").itertuples()
    assert row.config == "fused" and row.rounds == 4

    def saving(values: dict[str, dict[int, float]]) -> float:
        base = np.array(list(values["baseline"].values()))
        opt = np.array(list(values["fused"].values()))
        return float(1 - np.exp(np.mean(np.log(opt / base))))

    assert row.delta == pytest.approx(saving(long_raw))
    assert saving(all_raw) - saving(long_raw) > 0.05  # what the short rounds would add
    # Within the quantisation of two 1.37 s windows of the true 16% saving.
    assert abs(row.delta - (1 - 100 / 119)) <= 2 * energy.quantisation_bound(1.37, 0.1)
    stored = energy_rows(frame)
    long_rows = stored[stored["block"] % 2 == 1]
    assert long_rows["value"].notna().all()
    assert all(e["quantisation_bound"] == pytest.approx(0.2 / 1.37) for e in long_rows["extra"])
    assert stored[stored["block"] % 2 == 0]["value"].isna().all()


# --- other meters are not subject to the 1 s rule --------------------------------------


def test_estimate_and_rapl_keep_short_windows(clock: Clock, tmp_path: Path) -> None:
    estimate = EstimatedCpuEnergyMeter(watts_per_core=10.0)
    with estimate.window() as w:
        clock.advance(0.3)
    assert w.joules == pytest.approx(3.0)
    assert w.warning is None and "excluded" not in w.extra
    assert "quantisation_bound" not in w.extra

    package = tmp_path / "powercap" / "intel-rapl:0"
    package.mkdir(parents=True)
    (package / "name").write_text("package-0\n")
    (package / "energy_uj").write_text("5000000\n")
    (package / "max_energy_range_uj").write_text("1000000000\n")
    with RaplEnergyMeter(tmp_path / "powercap").window() as w:
        clock.advance(0.3)
        (package / "energy_uj").write_text("7500000\n")
    assert w.seconds == pytest.approx(0.3)
    assert w.joules == pytest.approx(2.5) and w.warning is None
    assert w.extra == {"packages": ["intel-rapl:0"], "wraps": 0}


def test_idle_power_is_read_from_the_runs_meter(clock: Clock, nvml: SteppingNvml) -> None:
    nvml.watts = 61.0
    idle = energy.measure_idle_power(NvmlEnergyMeter(0))
    assert idle is not None and idle["source"] == "measured" and idle["seconds"] >= 3.0
    assert abs(idle["watts"] - 61.0) <= 61.0 * idle["quantisation_bound"]
    estimate = energy.EstimatedCpuEnergyMeter(7.5)
    assert energy.measure_idle_power(estimate) is None  # an estimate has no idle to measure


def test_energy_per_request_token_and_above_idle_follow_from_the_window() -> None:
    window = Sample("a", 3, "energy_j", 240.0, "J", source="measured", extra={"window_s": 2.0})
    rows = {s.metric: s for s in energy.per_request_energy([window], 8, 64, idle_watts=100.0)}
    assert rows["energy_per_request_j"].value == 30.0
    assert rows["energy_per_token_j"].value == 240.0 / 64
    assert rows["energy_above_idle_j"].value == 240.0 - 100.0 * 2.0
    assert rows["energy_above_idle_per_token_j"].value == 40.0 / 64
    assert {s.source for s in rows.values()} == {"measured"}
    assert {(s.config, s.block) for s in rows.values()} == {("a", 3)}
    plain = energy.per_request_energy([window], 8, 64)
    assert {s.metric for s in plain} == {"energy_per_request_j", "energy_per_token_j"}
    excluded = Sample("a", 3, "energy_j", math.nan, "J", source="measured", extra={"window_s": 0.5})
    assert all(math.isnan(s.value) for s in energy.per_request_energy([excluded], 8, 64, 100.0))
