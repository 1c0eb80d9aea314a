"""Comparing two stored runs: a planted change found with its sign, the CI gate, the
environment warnings, `compound runs`, and gzipped curated runs."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest

from bench.cli import main
from bench.store import RunStore
from core.samples import PROCESS_KEY, Sample

ENVIRONMENT = {
    "device": "cpu",
    "cpu": {"model": "Test CPU"},
    "gpu": None,
    "versions": {"torch": "2.13.0", "transformers": "5.24.0", "python": "3.11.7"},
    "git": {"commit": "a" * 40, "dirty": False},
}
CONFIG = {"source": {"preset": "tiny"}, "protocol": {"threads": 2}, "configurations": []}


def _store(results, run_id, fast_factor, *, seed, environment=ENVIRONMENT, stall=1.0):
    """A run of 6 processes × 5 rounds: `fast` takes `fast_factor` of the baseline's time,
    under shared drift per round and 2% noise; the baseline's first block takes `stall` times
    as long."""
    rng = np.random.default_rng(seed)
    config = {**CONFIG, "configurations": [{"name": "baseline"}, {"name": "fast"}]}
    with RunStore.create(results, config, environment, run_id) as store:
        block = 0
        for process in range(6):
            offset = rng.normal(1.0, 0.02)  # every process is a little different
            for _ in range(5):
                drift = rng.normal(1.0, 0.03)
                for name, factor in (("baseline", 1.0), ("fast", fast_factor)):
                    value = 0.02 * offset * drift * factor * rng.normal(1.0, 0.02)
                    value *= stall if (name, block) == ("baseline", 0) else 1.0
                    extra = {PROCESS_KEY: process}
                    sample = Sample(name, block, "latency_mean_s", value, "s", extra=extra)
                    store.append_block(name, block, [sample])
                block += 1
        store.set_state("complete")


@pytest.fixture()
def two_runs(tmp_path):
    _store(tmp_path, "before", 0.80, seed=0)
    _store(tmp_path, "after", 0.88, seed=1)  # `fast` got 10% slower
    return tmp_path


def _compare(results, *extra, capsys):
    code = main(["compare", "before", "after", "--results-dir", str(results), "--json", *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_a_planted_slowdown_is_found_with_its_sign(two_runs, capsys):
    code, report, _ = _compare(two_runs, capsys=capsys)
    assert code == 0
    rows = {row["config"]: row for row in report["changes"]}
    fast, baseline = rows["fast"], rows["baseline"]
    assert fast["delta"] == pytest.approx(-0.10, abs=0.04) and fast["hi"] < 0
    assert fast["word"] == "higher" and fast["units"] == "processes"
    assert baseline["lo"] < 0 < baseline["hi"] and baseline["word"] == "unresolved"
    assert report["environment_differences"] == []


def test_one_stalled_block_barely_moves_the_change(two_runs, capsys):
    _store(two_runs, "stalled", 0.88, seed=1, stall=5.0)  # "after" with one 5× block
    deltas = {}
    for after in ("after", "stalled"):
        main(["compare", "before", after, "--results-dir", str(two_runs), "--json"])
        rows = json.loads(capsys.readouterr().out)["changes"]
        (row,) = [r for r in rows if r["config"] == "baseline"]
        deltas[after] = row["delta"]
    # A mean over the process's 5 rounds would move by log(5)/5/6 processes ≈ 5%.
    assert abs(deltas["stalled"] - deltas["after"]) < 0.01


def test_the_gate_fails_only_beyond_its_threshold(two_runs, capsys):
    code, report, err = _compare(two_runs, "--fail-if-slower", "5", capsys=capsys)
    assert code == 1 and report["gate"]["crossed"] == ["fast"]
    assert err.startswith("compound: gate crossed") and err.count("\n") == 1
    code, report, _ = _compare(two_runs, "--fail-if-slower", "25", capsys=capsys)
    assert code == 0 and report["gate"]["crossed"] == []


def test_environment_differences_are_warned(tmp_path, capsys):
    _store(tmp_path, "before", 0.8, seed=0)
    changed = {**ENVIRONMENT, "versions": {**ENVIRONMENT["versions"], "torch": "2.11.0"}}
    _store(tmp_path, "after", 0.8, seed=1, environment=changed)
    code, report, _ = _compare(tmp_path, capsys=capsys)
    assert code == 0
    assert report["environment_differences"] == ["torch: 2.13.0 (A) vs 2.11.0 (B)"]


def test_runs_lists_them_and_compare_reads_gzipped_samples_by_path(two_runs, capsys):
    assert main(["runs", "--results-dir", str(two_runs), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["id"] for row in listed] == ["after", "before"]
    assert listed[0]["configurations"] == 2 and listed[0]["state"] == "complete"
    packed = two_runs / "packed"
    shutil.copytree(two_runs / "after", packed)
    samples = packed / "samples.jsonl"
    (packed / "samples.jsonl.gz").write_bytes(gzip.compress(samples.read_bytes()))
    samples.unlink()
    code = main(["compare", str(two_runs / "before"), str(packed), "--json"])
    rows = {row["config"]: row for row in json.loads(capsys.readouterr().out)["changes"]}
    assert code == 0 and rows["fast"]["word"] == "higher"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "after"], "no run 'nope'"),
        (["before", "after", "--metric", "speed"], "unknown metric 'speed'"),
        (["before", "after", "--fail-if-slower", "-1"], "must be at least 0"),
    ],
)
def test_bad_input_is_one_line(two_runs, capsys, args, message):
    assert main(["compare", *args, "--results-dir", str(two_runs)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_each_run_is_compared_at_its_primary_batch_size(tmp_path, capsys):
    from core.samples import BATCH_KEY

    def stored(run_id, sizes):
        config = {**CONFIG, "serving": {"batch_sizes": sizes}}
        rng = np.random.default_rng(0)
        with RunStore.create(tmp_path, config, ENVIRONMENT, run_id) as store:
            for block in range(12):
                samples = []
                for size in sizes:  # a batch of 4 serves each request in a quarter of the time
                    value = 0.02 / size * rng.normal(1.0, 0.01)
                    extra = {PROCESS_KEY: block // 4, BATCH_KEY: size}
                    samples.append(
                        Sample("baseline", block, "latency_mean_s", value, "s", extra=extra)
                    )
                store.append_block("baseline", block, samples)
            store.set_state("complete")

    stored("mixed", [1, 4])
    stored("single", [1])
    assert main(["compare", "mixed", "single", "--results-dir", str(tmp_path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["changes"]
    assert abs(row["delta"]) < 0.02  # batch 1 against batch 1, not a mix of 1 and 4
