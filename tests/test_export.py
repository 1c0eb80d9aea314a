"""A run exported in pytest-benchmark's format is read by `pytest-benchmark compare`, with the
run's own per-round data and machine."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from bench.cli import main
from tests.test_compare import _store


def test_export_is_read_by_pytest_benchmark_compare(tmp_path, capsys):
    _store(tmp_path, "before", 0.8, seed=0)
    assert main(["export", "--pytest-benchmark", "before", "--results-dir", str(tmp_path)]) == 0
    document = json.loads(capsys.readouterr().out)
    benchmarks = {b["name"]: b for b in document["benchmarks"]}
    assert sorted(benchmarks) == ["baseline", "fast"]
    fast = benchmarks["fast"]["stats"]
    assert fast["rounds"] == len(fast["data"]) == 30
    assert fast["median"] == np.median(fast["data"]) and fast["iterations"] == 1
    assert document["machine_info"]["processor"] == "Test CPU"
    assert document["commit_info"]["id"] == "a" * 40
    path = tmp_path / "export.json"
    path.write_text(json.dumps(document))
    shown = subprocess.run(
        [sys.executable, "-m", "pytest_benchmark", "compare", str(path), "--columns", "median"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "fast" in shown.stdout and "baseline" in shown.stdout
    histogram = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_benchmark",
            "compare",
            str(path),
            "--histogram",
            str(tmp_path / "hist"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert histogram.returncode == 0 and (tmp_path / "hist-before.svg").is_file()


def test_a_run_with_no_rounds_says_so(tmp_path, capsys):
    from bench.store import RunStore

    RunStore.create(tmp_path, {"configurations": []}, {}, "empty").close()
    assert main(["export", "--pytest-benchmark", "empty", "--results-dir", str(tmp_path)]) == 2
    assert "no timed rounds" in capsys.readouterr().err
