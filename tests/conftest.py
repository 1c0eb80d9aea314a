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
def tiny_cache_view(tiny_cache, tmp_path) -> Path:
    """A cache of this test's own that links to the trained `tiny` teacher, so what the test
    writes there (a kept calibration) cannot leak into other tests through `tiny_cache`."""
    view = tmp_path / "cache-view"
    view.mkdir()
    for entry in tiny_cache.iterdir():
        if entry.name != "calibrations":
            (view / entry.name).symlink_to(entry)
    return view


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache, also set in the environment so CLI calls see it."""
    monkeypatch.setenv("COMPOUND_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
