"""Known-answer tests for bench.judge.stats: robust summaries."""

from __future__ import annotations

import numpy as np
import pytest

from bench.judge.stats import summarize

# --- summarize ---------------------------------------------------------------------------


def test_summarize_known_values_and_noisy():
    s = summarize(np.arange(1, 101))  # linear interpolation percentiles, worked by hand
    assert s.n == 100
    assert s.median == pytest.approx(50.5)
    assert s.mean == pytest.approx(50.5)
    assert s.iqr == pytest.approx(75.25 - 25.75)
    assert s.p90 == pytest.approx(90.1)
    assert s.p99 == pytest.approx(99.01)
    assert s.rel_iqr == pytest.approx(49.5 / 50.5)
    assert s.noisy


def test_summarize_quiet_and_ignores_nan():
    s = summarize([104.0, 100.0, np.nan, 102.0, 101.0, 103.0])
    assert s.n == 5
    assert s.median == pytest.approx(102.0)
    assert s.iqr == pytest.approx(2.0)
    assert s.rel_iqr == pytest.approx(2.0 / 102.0)
    assert not s.noisy


def test_summarize_rejects_empty():
    with pytest.raises(ValueError, match="no finite"):
        summarize([np.nan])


# --- paired_delta --------------------------------------------------------------------------
