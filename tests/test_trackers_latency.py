"""The clock, per-module attribution and the transform-event tracker, checked against known
durations and against torch.utils.benchmark on a fixed workload."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.utils.benchmark as tbench
from torch import nn

from bench.measure.trackers.events import EventTracker
from bench.measure.trackers.latency import Clock, RequestTiming, set_threads
from bench.measure.trackers.modules import ModuleTimer
from models.events import Events

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


# --- Clock --------------------------------------------------------------------------------


def timed(clock: Clock, fn: Callable[[], object]) -> float:
    """Seconds `fn` takes by `clock`'s marks (synchronising before reading them)."""
    start = clock.mark()
    fn()
    end = clock.mark()
    clock.synchronize()
    seconds = clock.seconds(start, end)
    clock.release([start, end])
    return seconds


def test_clock_known_duration() -> None:
    assert SLEEP_S <= timed(Clock("cpu"), lambda: time.sleep(SLEEP_S)) < SLEEP_S + SLACK_S


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
        clock = Clock(device)

        def block(calls: int = calls) -> None:
            for _ in range(calls):
                fn()

        ours.extend(timed(clock, block) / calls for _ in range(len(measurement.times)))
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
    pytest.fail(f"Clock / torch.utils.benchmark median ratios {ratios}, want 1 ± 0.05")


def test_clock_agrees_with_torch_benchmark_cpu(one_thread: None) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(384, 384, generator=g), torch.randn(384, 384, generator=g)
    _assert_agrees(lambda: torch.mm(torch.mm(a, b), b), "cpu")  # ~2-3 ms on one thread


@needs_cuda
def test_clock_agrees_with_torch_benchmark_cuda() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(4096, 4096, device="cuda", generator=g)
    b = torch.randn(4096, 4096, device="cuda", generator=g)
    _assert_agrees(lambda: torch.mm(a, b), "cuda")  # GPU-bound, a few ms


@needs_cuda
def test_clock_cuda_known_duration() -> None:
    assert SLEEP_S * 0.99 <= timed(Clock("cuda"), lambda: time.sleep(SLEEP_S)) < SLEEP_S + SLACK_S


# --- RequestTiming ---------------------------------------------------------


def test_request_timing_from_token_times() -> None:
    t = RequestTiming.from_token_times(prefill=0.5, token_times=[0.1, 0.2, 0.3], end_to_end=1.2)
    assert t.decode == pytest.approx(0.6)
    assert t.decode_tokens == 3 and t.new_tokens == 4
    assert t.time_per_output_token == pytest.approx(0.2)
    assert RequestTiming(prefill=0.1, end_to_end=0.1).time_per_output_token is None


def test_request_timing_rejects_inconsistent_decode() -> None:
    with pytest.raises(ValueError):
        RequestTiming(
            prefill=0.1, end_to_end=1, decode=0.2, decode_tokens=3, decode_per_token=[0.1, 0.1]
        )
    with pytest.raises(ValueError):
        RequestTiming(prefill=0.1, end_to_end=1, decode_tokens=-1)


# --- ModuleTimer -------------------------------------------------------


def test_module_timer_totals_and_counts() -> None:
    model, x, forwards = Fake(), torch.zeros(1), 3
    with ModuleTimer({"a": model.a, "b": model.b}, "cpu") as timer:
        for _ in range(forwards):
            model(x)
    times = timer.collect()
    assert times["a"].calls == forwards and times["b"].calls == 2 * forwards
    for name, expected in (("a", 0.02 * forwards), ("b", 0.02 * forwards)):
        assert expected <= times[name].seconds < expected + SLACK_S
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


# --- EventTracker: the harness times what transforms report ------------------------------


class Waking(nn.Module):
    """A stand-in transform's work: it opens a span around 10 ms and reports a value."""

    def __init__(self, events: Events) -> None:
        super().__init__()
        self.events = events

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.events.span("wake_s", "vision_encoder"):
            time.sleep(0.01)
        self.events.value("kept", 0.5, "fraction", "total")
        return x


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_event_tracker_times_spans_and_keeps_values(device: str, request) -> None:
    if device == "cuda":
        request.getfixturevalue("fake_cuda")
    events = Events()
    module = Waking(events)
    module(torch.zeros(1))  # nobody listening: nothing recorded, nothing raised
    tracker = EventTracker(device)
    events.listener = tracker
    for _ in range(2):
        module(torch.zeros(1))
    samples = tracker.samples("cfg", 3, 0.0, 1.0)
    spans = [s for s in samples if s.metric == "wake_s"]
    assert len(spans) == 2 and all(0.01 <= s.value < 0.01 + SLACK_S for s in spans)
    assert {(s.module, s.unit, s.block, s.config) for s in spans} == {
        ("vision_encoder", "s", 3, "cfg")
    }
    assert [s.value for s in samples if s.metric == "kept"] == [0.5, 0.5]
    assert tracker.samples("cfg", 4, 0.0, 1.0) == []  # drained


def test_event_tracker_cuda_path_syncs_once_per_drain(fake_cuda: FakeCuda) -> None:
    events = Events()
    events.listener = tracker = EventTracker("cuda")
    for _ in range(3):
        with events.span("wake_s"):
            time.sleep(0.01)
    assert fake_cuda.syncs == 0  # timing a span adds no synchronisation to serving
    assert len(tracker.samples("cfg", 0, 0.0, 1.0)) == 3 and fake_cuda.syncs == 1


def test_a_cloned_bundle_does_not_inherit_the_listener() -> None:
    import copy

    events = Events()
    events.listener = EventTracker("cpu")
    assert copy.deepcopy(events).listener is None
