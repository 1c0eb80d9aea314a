"""How to time a compound transform with pytest-benchmark, in a user's own test suite.

`benchmark.pedantic` runs a fixed number of rounds; on CUDA the timed function must wait for
the device (kernels are launched asynchronously, so without `synchronize` the timer would
stop before the work ends). Tests here never assert times: this one checks that the timed
transform still answers as the baseline does, and leaves the timing to pytest-benchmark's
table (`--benchmark-json` saves it for `pytest-benchmark compare`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from bench.configuration import TransformSpec
from models.checkpoint import cache_dir, load_trained
from models.dataset import make_examples
from models.generation import generate
from optimizations.registry import apply_transforms


def synchronized(function: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """`function`, then wait for the device, so a timer around it times the work."""

    def timed() -> Any:
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    return timed


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    return load_trained("tiny", cache_dir(tiny_cache), device="cpu", dtype=torch.float32)


def test_fused_qkv_timed_through_pytest_benchmark(benchmark, tiny):
    (example,) = make_examples(0, "test", 1, 1.0)
    request = tiny.prompts.encode(example)
    fused = apply_transforms(tiny, (TransformSpec("fused_qkv"),))
    serve = synchronized(lambda: generate(fused, request, 4), fused.device)
    benchmark.extra_info["transform"] = "fused_qkv"
    tokens = benchmark.pedantic(serve, rounds=5, iterations=1, warmup_rounds=1)
    assert torch.equal(tokens, generate(tiny, request, 4))
    assert benchmark.stats.stats.rounds == 5
