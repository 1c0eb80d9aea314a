"""Latency timers and per-module attribution, checked against known durations and
against torch.utils.benchmark on a fixed workload."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.utils.benchmark as tbench
from torch import nn

from bench.measure.trackers.latency import (
    RequestTiming,
    Stopwatch,
    set_threads,
    throughput,
    time_call,
)
from bench.measure.trackers.modules import (
    ModuleTimer,
    ShareOverrunWarning,
    measure_hook_overhead,
    module_shares,
)

SLEEP_S = 0.05
SLACK_S = 0.15  # generous: the machine is shared, sleep only guarantees a lower bound
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Sleep(nn.Module):
    """A module whose forward takes a known time."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


class Fake(nn.Module):
    """a: 20 ms once; b: 10 ms twice; c: 10 ms unhooked, so shares are 0.4 / 0.4 / 0.2."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Sleep(0.02)
        self.b = Sleep(0.01)
        self.c = Sleep(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.b(self.a(x))))


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    set_threads(1)
    yield
    torch.set_num_threads(before)


def no_hooks(*modules: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


class FakeCuda:
    """Stands in for torch.cuda's Event and synchronize on a machine without a GPU.

    An event stamps the host clock when recorded; reading elapsed time before a
    synchronize that follows the last record fails, as reading an unfinished
    CUDA event would be wrong.
    """

    def __init__(self) -> None:
        self.created = 0
        self.syncs = 0
        self.unsynced = False
        owner = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing
                owner.created += 1
                self.ns = 0

            def record(self) -> None:
                self.ns = time.perf_counter_ns()
                owner.unsynced = True

            def elapsed_time(self, end: Event) -> float:
                assert not owner.unsynced, "event read before synchronize"
                return (end.ns - self.ns) / 1e6

        self.Event = Event

    def synchronize(self, device: object = None) -> None:
        self.syncs += 1
        self.unsynced = False


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    return fake


# --- Stopwatch, time_call -------------------------------------------------------------


def test_stopwatch_known_duration() -> None:
    sw = Stopwatch("cpu")
    with sw.interval("sleep"):
        time.sleep(SLEEP_S)
    (seconds,) = sw.durations()["sleep"]
    assert SLEEP_S <= seconds < SLEEP_S + SLACK_S


def test_stopwatch_accumulates_names_in_order_and_skips_failed_intervals() -> None:
    sw = Stopwatch("cpu")
    for s in (0.03, 0.01):
        with sw.interval("decode"):
            time.sleep(s)
    with sw.interval("prefill"):
        pass
    with pytest.raises(KeyError), sw.interval("broken"):
        raise KeyError("x")
    durations = sw.durations()
    assert set(durations) == {"decode", "prefill"}
    first, second = durations["decode"]
    assert first >= 0.03 and second >= 0.01 and first > second
    sw.reset()
    assert sw.durations() == {}


def test_time_call_known_duration() -> None:
    assert SLEEP_S <= time_call(lambda: time.sleep(SLEEP_S), "cpu") < SLEEP_S + SLACK_S


def test_set_threads_returns_value_in_effect() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError):
        set_threads(0)


# --- cross-check against torch.utils.benchmark -----------------------------------------


def _agreement(fn: Callable[[], object], device: str, rounds: int) -> float:
    """Our median / torch.utils.benchmark's median, measurements interleaved by round.

    Ours times blocks of the same size as theirs (`number_per_run` calls), so both
    take a median of block means and contention from other jobs hits both alike.
    """
    timer = tbench.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(rounds):
        measurement = timer.blocked_autorange(min_run_time=0.1)
        theirs.extend(measurement.times)
        calls = measurement.number_per_run
        sw = Stopwatch(device)
        for _ in range(len(measurement.times)):
            with sw.interval("block"):
                for _ in range(calls):
                    fn()
        ours.extend(d / calls for d in sw.durations()["block"])
    return float(np.median(ours) / np.median(theirs))


def _assert_agrees(fn: Callable[[], object], device: str, attempts: int = 3) -> None:
    """Within 5%, allowing retries for a shared machine; a systematic error fails all."""
    for _ in range(5):  # warm-up
        fn()
    ratios = []
    for _ in range(attempts):
        ratios.append(_agreement(fn, device, rounds=6))
        if abs(ratios[-1] - 1) <= 0.05:
            return
    pytest.fail(f"Stopwatch / torch.utils.benchmark median ratios {ratios}, want 1 ± 0.05")


def test_stopwatch_agrees_with_torch_benchmark_cpu(one_thread: None) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(384, 384, generator=g), torch.randn(384, 384, generator=g)
    _assert_agrees(lambda: torch.mm(torch.mm(a, b), b), "cpu")  # ~2-3 ms on one thread


@needs_cuda
def test_stopwatch_agrees_with_torch_benchmark_cuda() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(4096, 4096, device="cuda", generator=g)
    b = torch.randn(4096, 4096, device="cuda", generator=g)
    _assert_agrees(lambda: torch.mm(a, b), "cuda")  # GPU-bound, a few ms


@needs_cuda
def test_stopwatch_cuda_known_duration_many_intervals_one_sync() -> None:
    sw = Stopwatch("cuda")
    for _ in range(3):
        with sw.interval("sleep"):
            time.sleep(SLEEP_S)
    seconds = sw.durations()["sleep"]
    assert len(seconds) == 3
    assert all(SLEEP_S * 0.99 <= s < SLEEP_S + SLACK_S for s in seconds)


# --- RequestTiming, throughput ---------------------------------------------------------


def test_request_timing_from_token_times() -> None:
    t = RequestTiming.from_token_times(
        prefill=0.5, token_times=[0.1, 0.2, 0.3], end_to_end=1.2, vision_encode=0.2
    )
    assert t.decode == pytest.approx(0.6)
    assert t.decode_tokens == 3 and t.new_tokens == 4
    assert t.time_per_output_token == pytest.approx(0.2)
    assert t.projector is None
    assert RequestTiming(prefill=0.1, end_to_end=0.1).time_per_output_token is None


def test_request_timing_rejects_inconsistent_decode() -> None:
    with pytest.raises(ValueError):
        RequestTiming(
            prefill=0.1, end_to_end=1, decode=0.2, decode_tokens=3, decode_per_token=[0.1, 0.1]
        )
    with pytest.raises(ValueError):
        RequestTiming(prefill=0.1, end_to_end=1, decode_tokens=-1)


def test_throughput_known_answer() -> None:
    timings = [
        RequestTiming(prefill=0.1, end_to_end=1.0, decode=0.9, decode_tokens=3),
        RequestTiming(prefill=0.1, end_to_end=1.0, decode=0.9, decode_tokens=5),
    ]
    assert throughput(timings, wall_s=2.0) == pytest.approx((1.0, 5.0))  # 10 tokens / 2 s
    with pytest.raises(ValueError):
        throughput(timings, wall_s=0.0)


# --- ModuleTimer, module_shares -------------------------------------------------------


def test_module_timer_totals_counts_and_shares() -> None:
    model, x, forwards = Fake(), torch.zeros(1), 3
    sw = Stopwatch("cpu")
    with ModuleTimer({"a": model.a, "b": model.b}, "cpu") as timer:
        with sw.interval("total"):
            for _ in range(forwards):
                model(x)
    times = timer.collect()
    total = sw.durations()["total"][0]
    assert times["a"].calls == forwards and times["b"].calls == 2 * forwards
    for name, expected in (("a", 0.02 * forwards), ("b", 0.02 * forwards)):
        assert expected <= times[name].seconds < expected + SLACK_S
    shares = module_shares({k: v.seconds for k, v in times.items()}, total)
    assert shares == pytest.approx({"a": 0.4, "b": 0.4, "other": 0.2}, abs=0.05)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert no_hooks(model.a, model.b)


def test_module_timer_collect_resolves_incrementally_and_reenter_resets() -> None:
    model, x = Fake(), torch.zeros(1)
    timer = ModuleTimer({"a": model.a}, "cpu")
    with timer:
        model(x)
        first = timer.collect()["a"]
        model(x)
        second = timer.collect()["a"]
    assert (first.calls, second.calls) == (1, 2)
    assert second.seconds >= first.seconds + 0.02
    with timer:
        model(x)
        with pytest.raises(RuntimeError, match="already active"), timer:
            pass
    assert timer.collect()["a"].calls == 1
    assert no_hooks(model.a)


def test_module_timer_removes_hooks_when_forward_raises() -> None:
    model = Fake()
    model.b = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        with ModuleTimer({"a": model.a, "b": model.b}, "cpu"):
            model(torch.zeros(1))
    assert no_hooks(model.a, model.b)


def test_module_timer_stays_paired_after_a_caught_failure() -> None:
    boom, ok = Boom(), Sleep(0.01)
    with ModuleTimer({"boom": boom, "ok": ok}, "cpu") as timer:
        with pytest.raises(RuntimeError):
            boom(torch.zeros(1))
        ok(torch.zeros(1))
    times = timer.collect()
    assert times["boom"].calls == 1 and times["ok"].calls == 1
    assert times["ok"].seconds >= 0.01


def test_module_timer_rejects_nested_handles() -> None:
    model = Fake()
    with pytest.raises(ValueError, match="'inner'.*'outer'"):
        ModuleTimer({"outer": model, "inner": model.a}, "cpu")
    with pytest.raises(ValueError, match="'x'.*'y'|'y'.*'x'"):
        ModuleTimer({"x": model.a, "y": model.a}, "cpu")
    assert no_hooks(model, model.a)


def test_module_shares_known_answer() -> None:
    assert module_shares({"a": 2.0, "b": 1.0}, 4.0) == pytest.approx(
        {"a": 0.5, "b": 0.25, "other": 0.25}
    )


def test_module_shares_overrun_is_flagged_not_clipped() -> None:
    with pytest.warns(ShareOverrunWarning):
        shares = module_shares({"a": 3.0, "b": 2.0}, 4.0)
    assert shares["other"] == pytest.approx(-0.25)
    assert sum(shares.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("seconds", "total"), [({"a": 1.0}, 0.0), ({"a": -1.0}, 1.0), ({"other": 1.0}, 2.0)]
)
def test_module_shares_rejects_bad_input(seconds: dict[str, float], total: float) -> None:
    with pytest.raises(ValueError):
        module_shares(seconds, total)


def test_measure_hook_overhead_structure() -> None:
    model, x = Fake(), torch.zeros(1)
    result = measure_hook_overhead(lambda: model(x), {"a": model.a, "b": model.b}, "cpu", repeats=3)
    assert len(result["off_s"]) == len(result["on_s"]) == 3
    assert result["off_median_s"] >= 0.05 and result["on_median_s"] >= 0.05
    assert result["overhead_s"] == pytest.approx(result["on_median_s"] - result["off_median_s"])
    assert abs(result["overhead_rel"]) < 0.5
    assert no_hooks(model.a, model.b)


@needs_cuda
def test_module_timer_cuda_known_durations() -> None:
    model, x = Fake().cuda(), torch.zeros(1, device="cuda")
    timer = ModuleTimer({"a": model.a, "b": model.b}, "cuda")
    for _ in range(2):  # second pass reuses pooled events
        with timer:
            model(x)
        times = timer.collect()
        assert (times["a"].calls, times["b"].calls) == (1, 2)
        assert 0.02 * 0.99 <= times["a"].seconds < 0.02 + SLACK_S
        assert 0.02 * 0.99 <= times["b"].seconds < 0.02 + SLACK_S
    assert no_hooks(model.a, model.b)


def test_stopwatch_cuda_path_syncs_once_for_many_intervals(fake_cuda: FakeCuda) -> None:
    sw = Stopwatch("cuda")
    for _ in range(3):
        with sw.interval("sleep"):
            time.sleep(0.01)
    assert fake_cuda.syncs == 0
    seconds = sw.durations()["sleep"]
    assert fake_cuda.syncs == 1 and len(seconds) == 3
    assert all(0.01 <= s < 0.01 + SLACK_S for s in seconds)
    assert sw.durations()["sleep"] == seconds and fake_cuda.syncs == 1  # nothing pending


def test_module_timer_cuda_path_resolves_after_sync_and_reuses_events(
    fake_cuda: FakeCuda,
) -> None:
    model, x = Fake(), torch.zeros(1)
    timer = ModuleTimer({"a": model.a, "b": model.b}, "cuda")
    for _ in range(2):
        with timer:
            model(x)
        times = timer.collect()
        assert (times["a"].calls, times["b"].calls) == (1, 2)
        assert 0.02 <= times["a"].seconds < 0.02 + SLACK_S
        assert 0.02 <= times["b"].seconds < 0.02 + SLACK_S
    assert fake_cuda.syncs == 2
    assert fake_cuda.created == 6  # 2 events x 3 calls, reused on the second pass
    assert no_hooks(model.a, model.b)
