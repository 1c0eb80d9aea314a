"""The calibration plant: a slowdown stretches each request by exactly its fraction."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from bench.configuration import Configuration
from bench.measure import worker as worker_module
from bench.measure.trackers.latency import RequestTiming


@pytest.mark.parametrize("slowdown", [0.0, 0.05, 0.5])
def test_serve_adds_the_planted_fraction_and_really_waits_it(monkeypatch, slowdown):
    model_seconds = 0.02
    monkeypatch.setattr(
        worker_module,
        "serve_timed",
        lambda *args, **kwargs: RequestTiming(prefill=model_seconds / 2, end_to_end=model_seconds),
    )
    stub = SimpleNamespace(
        bundle=None,
        spec=SimpleNamespace(workload=SimpleNamespace(new_tokens=4)),
        clock=None,
        engine="eager",
        cache_length=None,
        configuration=Configuration("planted", slowdown=slowdown),
    )
    started = time.perf_counter()
    timing = worker_module.Worker.serve(stub, batch=[])
    waited = time.perf_counter() - started
    assert timing.end_to_end == pytest.approx(model_seconds * (1 + slowdown))
    assert timing.prefill == model_seconds / 2  # the plant lands after the model, not in prefill
    assert waited >= model_seconds * slowdown  # a busy wait, not only a relabelled number
