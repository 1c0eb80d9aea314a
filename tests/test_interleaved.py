"""The shared timing protocol on fakes with known answers: a warm-up round, every kernel once
per round in a shuffled order, and the median ratio's interval."""

from __future__ import annotations

import math

import numpy as np

from bench.measure.interleaved import interleaved_rounds, median_ratio


def test_rounds_time_every_kernel_after_a_warm_up_in_shuffled_orders():
    log = []
    costs = {"a": 2.0, "b": 1.0}

    def time_calls(kernel, calls):
        name = kernel()
        log.append(name)
        return costs[name] * calls

    kernels = {name: (lambda n=name: n) for name in costs}
    per_round = interleaved_rounds(kernels, time_calls, calls=3, rounds=20, seed=0)
    assert log[:2] == ["a", "b"] and len(log) == 2 + 2 * 20
    assert {tuple(log[i : i + 2]) for i in range(2, len(log), 2)} == {("a", "b"), ("b", "a")}
    assert per_round["a"].tolist() == [6.0] * 20 and per_round["b"].tolist() == [3.0] * 20


def test_median_ratio_and_its_interval():
    median, low, high = median_ratio(np.full(10, 2.0))
    assert (median, low, high) == (2.0, 2.0, 2.0)
    median, low, high = median_ratio(np.arange(1.0, 102.0))
    assert median == 51.0 and low < 51.0 < high
    median, low, high = median_ratio([1.0, 3.0])
    assert median == 2.0 and math.isnan(low) and math.isnan(high)
