"""Shared fixtures: one trained `tiny` checkpoint per test session, in a private cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A cache directory holding a trained `tiny` teacher (trained once, ~30 s on 2 cores)."""
    from models.teacher import ensure_trained

    cache = tmp_path_factory.mktemp("cache")
    ensure_trained("tiny", cache, show_progress=False)
    return cache


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache, also set in the environment so CLI calls see it."""
    monkeypatch.setenv("COMPOUND_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
