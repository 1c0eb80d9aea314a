"""Tests for the results store: round trips, kill-safety, resume, and clear errors.

A writer holds the run's lock (flock conflicts even inside one process), so a test that reopens
a run to write closes the first store before: as a resumed run follows a finished process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bench.store import (
    FAILURE_COLUMNS,
    SAMPLE_COLUMNS,
    RunStore,
    list_runs,
    load_run,
    new_run_id,
)
from core.errors import CompoundError
from core.samples import SOURCES, Sample

CONFIG = {"configs": ["baseline", "sparse"], "blocks": 4, "path": "results"}
ENV = {"torch": "2.11", "device": "cpu"}


def make_block(config: str, block: int, n: int = 3) -> list[Sample]:
    """Distinct, exactly representable values so round trips can be compared with ==."""
    return [
        Sample(
            config=config,
            block=block,
            metric="latency",
            value=block * 10.0 + i + 0.25,
            unit="ms",
            module="total" if i == 0 else f"layers.{i}.mlp",
            source=SOURCES[i % len(SOURCES)],
            t_start=100.0 + block,
            t_end=100.5 + block,
            extra={"i": i, "tag": config, "nested": {"ok": True}},
        )
        for i in range(n)
    ]


def raw_lines(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def sample_records(samples: list[Sample]) -> list[dict]:
    return [{"kind": "sample", **s.to_dict()} for s in samples]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    with RunStore.create(tmp_path, CONFIG, ENV, run_id="run-a") as created:
        yield created


def test_new_run_id_format_and_uniqueness() -> None:
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) > 45  # 16-bit suffix: a handful of collisions in 50 would be a bug
    for run_id in ids:
        assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", run_id)


def test_create_writes_run_json(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, CONFIG, ENV)
    meta = json.loads((store.path / "run.json").read_text())
    assert meta["run_id"] == store.run_id == store.path.name
    assert meta["state"] == "running" == store.meta["state"]
    assert meta["config"] == CONFIG == store.config
    assert meta["environment"] == ENV == store.meta["environment"]
    assert list_runs(tmp_path) == [store.run_id]
    assert not [p for p in store.path.iterdir() if p.name.endswith(".tmp")]


def test_create_stores_numpy_and_paths_as_json(tmp_path: Path) -> None:
    config = {"n": np.int64(3), "w": np.array([0.5, 0.25]), "out": Path("/x/y")}
    store = RunStore.create(tmp_path, config, ENV, run_id="np")
    assert RunStore.open(tmp_path, "np").config == {"n": 3, "w": [0.5, 0.25], "out": "/x/y"}
    assert store.run_id == "np"


def test_create_on_existing_run_refuses(store: RunStore, tmp_path: Path) -> None:
    store.close()  # a live writer would be named instead (test_store_hardening)
    with pytest.raises(CompoundError, match="already exists"):
        RunStore.create(tmp_path, CONFIG, ENV, run_id="run-a")


def test_create_refuses_bad_run_id(tmp_path: Path) -> None:
    with pytest.raises(CompoundError, match="invalid run id"):
        RunStore.create(tmp_path, CONFIG, ENV, run_id="../escape")


def test_round_trip_samples(store: RunStore, tmp_path: Path) -> None:
    blocks = [make_block("baseline", 0, 4), make_block("sparse", 0, 4), make_block("baseline", 1)]
    for samples in blocks:
        store.append_block(samples[0].config, samples[0].block, samples)
    frame = load_run(store.path).samples
    assert list(frame.columns) == list(SAMPLE_COLUMNS)
    expected = [s.to_dict() for samples in blocks for s in samples]
    assert frame.to_dict("records") == expected
    assert set(frame["source"]) == set(SOURCES)
    assert frame["extra"].iloc[1] == {"i": 1, "tag": "baseline", "nested": {"ok": True}}
    assert frame["block"].dtype == np.int64 and frame["value"].dtype == np.float64
    assert store.completed_blocks() == {("baseline", 0), ("sparse", 0), ("baseline", 1)}
    assert RunStore.open(tmp_path, "run-a").samples_frame().equals(frame)


def test_append_block_rejects_mismatched_or_repeated_blocks(store: RunStore) -> None:
    with pytest.raises(ValueError, match="given to block"):
        store.append_block("baseline", 1, make_block("baseline", 0))
    store.append_block("baseline", 0, make_block("baseline", 0))
    with pytest.raises(ValueError, match="already stored"):
        store.append_block("baseline", 0, make_block("baseline", 0))


def test_block_with_no_samples_counts_as_done(store: RunStore) -> None:
    store.append_block("baseline", 0, [])
    assert store.completed_blocks() == {("baseline", 0)}
    assert store.samples_frame().empty


def test_simulated_kill_then_resume(store: RunStore, tmp_path: Path) -> None:
    store.append_block("baseline", 0, make_block("baseline", 0))
    # Killed while writing block 1: its sample lines are there, the marker is not, and the
    # last line was cut off halfway.
    partial = raw_lines(sample_records(make_block("baseline", 1)))
    with open(store.samples_path, "a") as handle:
        handle.write(partial[: len(partial) - 40])
    store.close()

    reopened = RunStore.open(tmp_path, "run-a", writer=True)
    assert reopened.completed_blocks() == {("baseline", 0)}
    assert set(load_run(store.path).samples["block"]) == {0}

    reopened.append_block("baseline", 1, make_block("baseline", 1))
    reopened.append_block("sparse", 0, make_block("sparse", 0))
    lines = store.samples_path.read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)  # nothing glued on
    frame = RunStore.open(tmp_path, "run-a").samples_frame()
    expected = [
        s.to_dict()
        for b in (make_block("baseline", 0), make_block("baseline", 1), make_block("sparse", 0))
        for s in b
    ]
    assert frame.to_dict("records") == expected


def test_unterminated_marker_line_does_not_count(store: RunStore, tmp_path: Path) -> None:
    # A kill just before the final newline: complete JSON, but the writer would cut it.
    text = raw_lines(
        [
            *sample_records(make_block("sparse", 2)),
            {"kind": "block_done", "config": "sparse", "block": 2, "n_samples": 3},
        ]
    )
    store.samples_path.write_text(text[:-1])
    store.close()
    reopened = RunStore.open(tmp_path, "run-a", writer=True)
    assert reopened.completed_blocks() == set()
    reopened.append_block("sparse", 2, make_block("sparse", 2))
    assert len(reopened.samples_frame()) == 3


def test_duplicate_completed_block_kept_once(store: RunStore) -> None:
    first = make_block("baseline", 0)
    second = [Sample(**{**s.to_dict(), "value": -1.0}) for s in first]
    marker = {"kind": "block_done", "config": "baseline", "block": 0, "n_samples": 3}
    store.samples_path.write_text(
        raw_lines([*sample_records(first), marker, *sample_records(second), marker])
    )
    frame = load_run(store.path).samples
    assert frame["value"].tolist() == [s.value for s in first]
    assert RunStore.open(store.path.parent, "run-a").completed_blocks() == {("baseline", 0)}


def test_marker_without_its_samples_is_an_error(store: RunStore) -> None:
    marker = {"kind": "block_done", "config": "baseline", "block": 0, "n_samples": 3}
    store.samples_path.write_text(raw_lines([*sample_records(make_block("sparse", 0)), marker]))
    with pytest.raises(CompoundError, match="does not follow its 3 samples"):
        store.samples_frame()


def test_corrupt_middle_line_is_an_error(store: RunStore) -> None:
    store.append_block("baseline", 0, make_block("baseline", 0))
    with open(store.samples_path, "a") as handle:
        handle.write("{not json\n")
    store.append_block("baseline", 1, make_block("baseline", 1))
    with pytest.raises(CompoundError, match="line 5 is not valid JSON"):
        load_run(store.path)


def test_resume_appends_only_missing_blocks(store: RunStore, tmp_path: Path) -> None:
    plan = [(c, b) for b in range(3) for c in ("baseline", "sparse")]
    for config, block in plan[:3]:
        store.append_block(config, block, make_block(config, block))
    store.set_state("interrupted")
    store.close()

    resumed = RunStore.open(tmp_path, "run-a", writer=True)
    assert resumed.meta["state"] == "interrupted"
    done = resumed.completed_blocks()
    for config, block in plan:
        if (config, block) not in done:
            resumed.append_block(config, block, make_block(config, block))
    resumed.set_state("complete")

    run = load_run(store.path)
    counts = run.samples.groupby(["config", "block"]).size()
    assert counts.to_dict() == {key: 3 for key in plan}
    assert run.meta["state"] == "complete"


def test_failures_and_extras(store: RunStore, tmp_path: Path) -> None:
    store.record_failure("sparse", "CUDA out of memory", block=2)
    store.record_failure("pipeline", "needs CUDA")
    store.record_extra("lossless_rejection", {"config": "quant", "max_abs_diff": 0.5})
    assert [(f["config"], f["block"], f["error"]) for f in store.failures()] == [
        ("sparse", 2, "CUDA out of memory"),
        ("pipeline", None, "needs CUDA"),
    ]
    assert store.extras("lossless_rejection") == [
        {"kind": "lossless_rejection", "config": "quant", "max_abs_diff": 0.5}
    ]
    assert store.extras("other") == []
    run = load_run(store.path)
    assert list(run.failures.columns) == list(FAILURE_COLUMNS)
    assert run.failures["block"].tolist() == [2, pd.NA]
    assert len(run.extras) == 1
    with pytest.raises(ValueError, match="reserved"):
        store.record_extra("failure", {})


def test_missing_or_corrupt_run_json(tmp_path: Path, store: RunStore) -> None:
    with pytest.raises(CompoundError, match="no run 'nope'.*run-a"):
        RunStore.open(tmp_path, "nope")
    (store.path / "run.json").write_text("{broken")
    with pytest.raises(CompoundError, match="not valid JSON"):
        RunStore.open(tmp_path, "run-a")
    (store.path / "run.json").write_text('{"run_id": "run-a"}')
    with pytest.raises(CompoundError, match="lacks the fields created, state, config"):
        load_run(store.path)
    (store.path / "run.json").unlink()
    with pytest.raises(CompoundError, match="no run.json"):
        RunStore.open(tmp_path, "run-a")
    assert list_runs(tmp_path) == []


def test_state_and_meta_persist(store: RunStore, tmp_path: Path) -> None:
    store.update_meta("hook_overhead", {"per_call_us": 1.5})
    store.set_state("interrupted")
    store.close()
    reopened = RunStore.open(tmp_path, "run-a", writer=True)
    assert reopened.meta["state"] == "interrupted"
    assert reopened.meta["hook_overhead"] == {"per_call_us": 1.5}
    reopened.set_state("complete")
    assert load_run(store.path).meta["state"] == "complete"
    with pytest.raises(ValueError, match="unknown run state"):
        reopened.set_state("done")
    with pytest.raises(ValueError, match="cannot be changed"):
        reopened.update_meta("config", {})


def test_empty_run_frames(store: RunStore) -> None:
    run = load_run(store.path)
    assert list(run.samples.columns) == list(SAMPLE_COLUMNS) and run.samples.empty
    assert list(run.failures.columns) == list(FAILURE_COLUMNS) and run.failures.empty
    assert run.extras == []
    assert store.completed_blocks() == set() and store.failures() == []


def test_summary_and_text_files(store: RunStore) -> None:
    summary = pd.DataFrame(
        {"delta": [0.1, 0.25]}, index=pd.Index(["latency", "energy"], name="metric")
    )
    store.write_summary(summary)
    loaded = pd.read_csv(store.path / "summary.csv")
    assert loaded.to_dict("list") == {"metric": ["latency", "energy"], "delta": [0.1, 0.25]}
    store.write_text("report.md", "# Report\n")
    assert (store.path / "report.md").read_text() == "# Report\n"
    for name in ("run.json", "../x.md", "samples.jsonl"):
        with pytest.raises(ValueError):
            store.write_text(name, "x")


def _child_appender(results_dir: str, counter: Any) -> None:
    """Append large blocks forever, bumping `counter` (a shared Value) after each one is stored."""
    store = RunStore.open(Path(results_dir), "run-a", writer=True)
    block = 0
    while True:
        store.append_block("baseline", block, make_block("baseline", block, n=400))
        counter.value = block + 1
        block += 1


@pytest.mark.parametrize("extra_delay", [0.0, 0.013])
def test_sigkilled_writer_leaves_exactly_the_completed_blocks(
    store: RunStore, tmp_path: Path, extra_delay: float
) -> None:
    store.close()  # the child is the writer now
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    child = ctx.Process(target=_child_appender, args=(str(tmp_path), counter))
    child.start()
    deadline = time.monotonic() + 30
    while counter.value < 3 and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(extra_delay)  # land the kill at another point of the child's loop
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.exitcode == -signal.SIGKILL
    reported = counter.value
    assert reported >= 3

    reopened = RunStore.open(tmp_path, "run-a", writer=True)  # the kill freed the lock
    done = reopened.completed_blocks()
    n_done = len(done)
    # The kill may land after a block is stored but before the counter moves.
    assert reported <= n_done <= reported + 1
    assert done == {("baseline", b) for b in range(n_done)}

    reopened.append_block("baseline", n_done, make_block("baseline", n_done, n=400))
    frame = load_run(store.path).samples
    assert frame.groupby("block").size().to_dict() == {b: 400 for b in range(n_done + 1)}
    expected = [s.value for b in range(n_done + 1) for s in make_block("baseline", b, n=400)]
    assert frame["value"].tolist() == expected
    for line in store.samples_path.read_text().splitlines():
        json.loads(line)  # every line parses once the writer resumed
