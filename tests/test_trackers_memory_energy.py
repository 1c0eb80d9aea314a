"""Tests for the memory, energy and cost/carbon trackers.

GPU paths run against a fake pynvml module injected into sys.modules; the real
CUDA tests skip on machines without a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from torch import nn

from bench.measure.trackers.cost import (
    carbon_grams,
    carbon_sample,
    cost_per_1k_requests,
    cost_sample,
)
from bench.measure.trackers.energy import (
    EstimatedCpuEnergyMeter,
    NvmlEnergyMeter,
    RaplEnergyMeter,
    nvml_handle,
    select_energy_meter,
    state_drift,
)
from bench.measure.trackers.memory import MemoryTracker, nvml_process_bytes, tensor_bytes
from core.samples import Sample

PROJECT_ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class FakeNvml(types.ModuleType):
    """Just enough of pynvml: counters and readings are plain attributes tests set."""

    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.energy_mj = 0
        self.sm_clock = 1980
        self.temperature = 40
        self.processes: list[Any] = []
        self.opened: list[tuple[str, Any]] = []

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.opened.append(("index", index))
        return f"handle-{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.opened.append(("uuid", uuid))
        return f"handle-{uuid}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        return self.energy_mj

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        return self.sm_clock if clock == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetMaxClockInfo(self, handle: str, clock: int) -> int:
        return 1980

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return self.temperature

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        return self.processes

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        return 700_000

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


# --- tensor_bytes -----------------------------------------------------------------


def test_tensor_bytes_counts_params_and_buffers_exactly() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    counts = tensor_bytes(model)
    # Linear 4×3 + 3, BatchNorm weight 3 + bias 3: 21 float32 values.
    assert counts["param_bytes"] == 21 * 4
    # running_mean 3 + running_var 3 float32, num_batches_tracked one int64.
    assert counts["buffer_bytes"] == 6 * 4 + 8
    assert counts["meta_tensors"] == 0


def test_tensor_bytes_counts_tied_weights_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    assert tensor_bytes(Tied())["param_bytes"] == 10 * 4 * 4


def test_tensor_bytes_counts_a_shared_storage_once() -> None:
    module = nn.Module()
    module.a = nn.Parameter(torch.zeros(8))
    module.b = nn.Parameter(module.a.data[:2])  # another Parameter, same storage
    module.register_buffer("c", module.a.data[4:])
    counts = tensor_bytes(module)
    assert counts["param_bytes"] == 8 * 4
    assert counts["buffer_bytes"] == 0


def test_tensor_bytes_sizes_meta_tensors_from_shape() -> None:
    with torch.device("meta"):
        model = nn.Linear(1000, 500).to(torch.float16)
    counts = tensor_bytes(model)
    assert counts["param_bytes"] == (1000 * 500 + 500) * 2
    assert counts["meta_tensors"] == 2


# --- MemoryTracker ----------------------------------------------------------------

_RSS_SCRIPT = """
import json, torch
from bench.measure.trackers.memory import MemoryTracker, peak_rss_bytes
before = peak_rss_bytes()
with MemoryTracker(torch.device("cpu"), module=torch.nn.Linear(8, 8)) as tracker:
    x = torch.ones(50_000_000)  # 200 MB, every page written
    del x
samples = tracker.samples("cfg", 0)
print(json.dumps({"before": before, "samples": [s.to_dict() for s in samples]}))
"""


def test_cpu_memory_tracker_sees_a_200mb_peak_in_a_fresh_process() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    by_metric = {s["metric"]: s for s in result["samples"]}
    assert set(by_metric) == {"peak_rss_bytes", "rss_bytes", "param_bytes", "buffer_bytes"}
    assert by_metric["peak_rss_bytes"]["value"] - result["before"] >= 150e6
    assert by_metric["param_bytes"]["value"] == (64 + 8) * 4
    assert all(s["unit"] == "bytes" and s["config"] == "cfg" for s in result["samples"])


_WINDOW_SCRIPT = """
import json, torch
from bench.measure.trackers.memory import MemoryTracker
peaks = []
for size in (50_000_000, 0):  # 200 MB in the first window, nothing in the second
    with MemoryTracker(torch.device("cpu")) as tracker:
        x = torch.ones(size)
        del x
    peak = next(s for s in tracker.samples("cfg", 0) if s.metric == "peak_rss_bytes")
    peaks.append([peak.value, peak.extra["scope"]])
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_cpu_peak_rss_is_each_windows_own_peak() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _WINDOW_SCRIPT],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    (first, first_scope), (second, second_scope) = json.loads(out.stdout.strip().splitlines()[-1])
    assert first_scope == second_scope == "window"
    assert first - second >= 150e6  # the second window does not inherit the first one's peak


def test_cpu_memory_tracker_records_no_gpu_metrics() -> None:
    with MemoryTracker(torch.device("cpu")) as tracker:
        pass
    samples = tracker.samples("base", 3)
    assert {s.metric for s in samples} == {"peak_rss_bytes", "rss_bytes"}
    assert all(s.source == "measured" and s.block == 3 and s.value > 0 for s in samples)
    assert tracker.t_start <= tracker.t_end


def test_nvml_process_bytes_takes_only_this_pid(fake_nvml: FakeNvml) -> None:
    fake_nvml.processes = [
        types.SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=9_000_000_000),
        types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=1_234_567),
    ]
    assert nvml_process_bytes(0) == (1_234_567.0, None)


def test_nvml_process_bytes_is_nan_when_pid_missing_or_unavailable(fake_nvml: FakeNvml) -> None:
    fake_nvml.processes = [types.SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=9e9)]
    value, warning = nvml_process_bytes(0)
    assert math.isnan(value) and "not in NVML" in warning
    fake_nvml.processes = [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)]
    value, warning = nvml_process_bytes(0)
    assert math.isnan(value) and "not available" in warning
    fake_nvml.fail_init = True
    value, warning = nvml_process_bytes(0)
    assert math.isnan(value) and "unavailable" in warning


@needs_cuda
def test_cuda_memory_tracker_sees_an_allocation() -> None:
    device = torch.device("cuda", 0)
    with MemoryTracker(device) as tracker:
        x = torch.ones(25_000_000, device=device)  # 100 MB
        del x
    values = {s.metric: s for s in tracker.samples("cfg", 0)}
    assert values["peak_allocated_bytes"].value >= 100e6
    assert values["peak_reserved_bytes"].value >= values["peak_allocated_bytes"].value
    nvml = values["nvml_process_bytes"]
    if math.isnan(nvml.value):
        # NVML unusable, or this pid hidden from it (container PID namespace): say so.
        assert nvml.extra["warning"], "a NaN NVML figure must carry its reason"
        pytest.skip(f"NVML per-process memory unavailable: {nvml.extra['warning']}")
    # NVML's figure adds the CUDA context to the allocator's cache, which still holds the 100 MB.
    assert nvml.extra["warning"] is None
    assert nvml.value > 100e6


# --- Energy: estimate -------------------------------------------------------------


def _cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def test_estimated_energy_is_cpu_time_times_watts() -> None:
    meter = EstimatedCpuEnergyMeter(watts_per_core=10.0)
    before = _cpu_seconds()
    with meter.window() as w:
        start = time.process_time()
        while time.process_time() - start < 0.3:
            pass
    cpu = _cpu_seconds() - before
    assert w.joules == pytest.approx(cpu * 10.0, abs=0.3)  # psutil ticks are 10 ms
    assert w.joules >= 3.0
    assert w.source == "estimated" and w.warning is None
    assert "10 W per busy core" in w.method and "estimated" in w.method
    (sample,) = w.samples("cfg", 1)
    assert (sample.metric, sample.unit, sample.source) == ("energy_j", "J", "estimated")
    assert sample.extra["method"] == w.method


def test_estimated_energy_ignores_wall_time_spent_idle() -> None:
    with EstimatedCpuEnergyMeter(watts_per_core=10.0).window() as w:
        time.sleep(0.3)
    assert w.seconds >= 0.3
    assert w.joules < 0.5  # 0.3 s asleep would be 3 J if wall time were used


# --- Energy: RAPL -----------------------------------------------------------------


def _domain(path: Path, name: str, energy_uj: int, max_uj: int = 1_000_000_000) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


@pytest.fixture
def rapl_root(tmp_path: Path) -> Path:
    root = tmp_path / "powercap"
    _domain(root / "intel-rapl:0", "package-0", 5_000_000)
    _domain(root / "intel-rapl:0" / "intel-rapl:0:0", "core", 1_000_000)
    _domain(root / "intel-rapl:0:0", "core", 1_000_000)  # the top-level alias of a sub-domain
    _domain(root / "intel-rapl:1", "package-1", 999_000_000)
    _domain(root / "intel-rapl:2", "psys", 7_000_000)  # whole platform: overlaps packages
    return root


def _set(path: Path, energy_uj: int) -> None:
    (path / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_packages_only_and_handles_wraparound(rapl_root: Path) -> None:
    assert RaplEnergyMeter.available(rapl_root)
    meter = RaplEnergyMeter(rapl_root)
    with meter.window() as w:
        _set(rapl_root / "intel-rapl:0", 7_000_000)  # +2 J
        _set(rapl_root / "intel-rapl:1", 500_000)  # wrapped: +1 J + 0.5 J
        for sub in ("intel-rapl:0:0", "intel-rapl:0/intel-rapl:0:0", "intel-rapl:2"):
            _set(rapl_root / sub, 900_000_000)  # must not count
    assert w.joules == pytest.approx(3.5)
    assert w.source == "measured" and w.warning is None
    assert w.extra == {"packages": ["intel-rapl:0", "intel-rapl:1"], "wraps": 1}


def test_rapl_zero_delta_is_nan_with_warning(rapl_root: Path) -> None:
    with RaplEnergyMeter(rapl_root).window() as w:
        pass
    assert math.isnan(w.joules) and "zero delta" in w.warning


def test_rapl_unavailable_falls_back_to_estimate(tmp_path: Path) -> None:
    assert not RaplEnergyMeter.available(tmp_path / "absent")
    assert not RaplEnergyMeter.available(tmp_path)
    meter = select_energy_meter(torch.device("cpu"), 4.0, rapl_root=tmp_path)
    assert isinstance(meter, EstimatedCpuEnergyMeter) and meter.watts_per_core == 4.0


def test_select_prefers_rapl_on_cpu(rapl_root: Path) -> None:
    meter = select_energy_meter(torch.device("cpu"), rapl_root=rapl_root)
    assert isinstance(meter, RaplEnergyMeter)


# --- Energy: NVML -----------------------------------------------------------------


def test_nvml_energy_delta(fake_nvml: FakeNvml) -> None:
    fake_nvml.energy_mj = 1_000_000
    meter = NvmlEnergyMeter(0, min_window_s=0.0)
    with meter.window() as w:
        fake_nvml.energy_mj = 1_250_500
        fake_nvml.sm_clock, fake_nvml.temperature = 1800, 52
    assert w.joules == pytest.approx(250.5)
    assert w.warning is None and w.source == "measured"
    assert w.extra["drifted"] is True and w.extra["temperature_c_change"] == 12
    (sample,) = w.samples("cfg", 2)
    assert (sample.metric, sample.value, sample.source) == ("energy_j", 250.5, "measured")
    assert sample.extra["meter"] == "nvml" and sample.extra["scope"] == "gpu"


def test_nvml_zero_delta_is_nan_with_warning(fake_nvml: FakeNvml) -> None:
    with NvmlEnergyMeter(0, min_window_s=0.0).window() as w:
        pass
    assert math.isnan(w.joules)
    assert "zero delta" in w.warning
    (sample,) = w.samples("cfg", 0)
    assert math.isnan(sample.value) and "zero delta" in sample.extra["warning"]


def test_nvml_short_window_is_excluded_keeping_the_raw_delta(fake_nvml: FakeNvml) -> None:
    with NvmlEnergyMeter(0).window() as w:
        fake_nvml.energy_mj += 40_000
    assert math.isnan(w.joules)
    assert w.extra["raw_joules"] == pytest.approx(40.0)
    assert "quantised" in w.extra["excluded"] and "quantised" in w.warning


def test_nvml_handle_follows_cuda_visible_devices(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    nvml_handle(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    nvml_handle(0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    nvml_handle(2)
    assert fake_nvml.opened == [("index", 5), ("uuid", "GPU-abc"), ("index", 2)]


def test_state_drift_within_tolerance() -> None:
    start = {"sm_clock_mhz": 1980.0, "temperature_c": 40.0}
    drift = state_drift(start, {"sm_clock_mhz": 1965.0, "temperature_c": 43.0})
    assert drift["sm_clock_rel_change"] == pytest.approx(-15 / 1980)
    assert drift["drifted"] is False


def test_select_uses_nvml_on_cuda_when_it_works(fake_nvml: FakeNvml, tmp_path: Path) -> None:
    meter = select_energy_meter(torch.device("cuda", 0), rapl_root=tmp_path)
    assert isinstance(meter, NvmlEnergyMeter)


def test_select_never_raises_without_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    meter = select_energy_meter(torch.device("cuda", 0), 5.0, rapl_root=tmp_path)
    assert isinstance(meter, EstimatedCpuEnergyMeter)
    assert meter.scope.startswith("cpu")


@needs_cuda
def test_real_nvml_energy_over_a_second_of_matmuls() -> None:
    meter = select_energy_meter(torch.device("cuda", 0))
    if not isinstance(meter, NvmlEnergyMeter):
        pytest.skip(
            f"NVML energy counter unusable on this GPU; select_energy_meter chose {meter.scope!r}"
        )
    x = torch.randn(4096, 4096, device="cuda")
    with meter.window() as w:
        deadline = time.perf_counter() + 1.2
        while time.perf_counter() < deadline:
            x = (x @ x).tanh_()
    assert w.seconds >= 1.2
    assert w.source == "measured" and w.warning is None
    assert math.isfinite(w.joules) and w.joules > 0


# --- Cost and carbon --------------------------------------------------------------


def test_cost_per_1k_requests_arithmetic() -> None:
    assert cost_per_1k_requests(3600.0, 1000, 2.0) == pytest.approx(2.0)
    assert cost_per_1k_requests(36.0, 100, 4.0) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        cost_per_1k_requests(1.0, 0, 2.0)


def test_cost_sample_is_derived_and_says_from_what() -> None:
    sample = cost_sample("cfg", 4, device_seconds=36.0, n_requests=100, price_per_device_hour=4.0)
    assert (sample.metric, sample.source, sample.block) == ("cost_usd_per_1k", "derived", 4)
    assert sample.value == pytest.approx(0.4)
    assert sample.extra["price_per_device_hour"] == 4.0


def test_carbon_grams_arithmetic() -> None:
    assert carbon_grams(3.6e6) == pytest.approx(475.0)
    assert carbon_grams(7.2e6, grid_g_per_kwh=100.0) == pytest.approx(200.0)


@pytest.mark.parametrize(
    ("energy_source", "expected"), [("estimated", "estimated"), ("measured", "derived")]
)
def test_carbon_source_follows_energy_source(energy_source: str, expected: str) -> None:
    energy = Sample(
        "cfg",
        1,
        "energy_j",
        36_000.0,
        "J",
        source=energy_source,
        t_start=1.0,
        t_end=2.0,
        extra={"meter": "m"},
    )
    co2 = carbon_sample(energy, grid_g_per_kwh=200.0)
    assert (co2.metric, co2.source, co2.config, co2.block) == ("co2_g", expected, "cfg", 1)
    assert co2.value == pytest.approx(2.0)
    assert co2.extra["energy_source"] == energy_source and co2.extra["grid_g_per_kwh"] == 200.0
    assert (co2.t_start, co2.t_end) == (1.0, 2.0)


def test_carbon_sample_rejects_non_energy_samples() -> None:
    with pytest.raises(ValueError):
        carbon_sample(Sample("cfg", 0, "latency_s", 1.0, "s"))
