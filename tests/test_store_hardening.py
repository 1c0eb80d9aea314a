"""The store against bad input, concurrency and interruption: one writer per run, checked
run.json and stored configuration, a repairable samples.jsonl, errors.log, bounded run ids."""

from __future__ import annotations

import json
import multiprocessing
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.configuration import (
    Configuration,
    ModelSource,
    Protocol,
    RunSpec,
    TransformSpec,
    WorkloadSpec,
)
from bench.store import MAX_RUN_ID_LENGTH, RunStore, check_run_id, load_run
from core.errors import CompoundError
from core.samples import Sample

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"configs": ["baseline"], "blocks": 3}
REPAIR_HINT = "`compound run --resume run-a --repair` drops the damaged lines and re-runs"

# Holds a run as its writer (a new run, or a resumed one) until killed.
HOLDER = """
import sys, time
from pathlib import Path
from bench.store import RunStore
results, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "create":
    store = RunStore.create(results, {"c": 1}, {}, run_id="live")
else:
    store = RunStore.open(results, "live", writer=True)
print("ready", flush=True)
time.sleep(120)
"""


@contextmanager
def holder(results: Path, mode: str) -> Iterator[subprocess.Popen[str]]:
    """Another process that writes run 'live' in `results` while the block runs."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(results), mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line == "ready\n", process.stderr.read() if process.stderr else ""
        yield process
    finally:
        process.kill()
        process.communicate()


def one_line(error: pytest.ExceptionInfo[CompoundError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def make_block(config: str, block: int, n: int = 3) -> list[Sample]:
    return [
        Sample(config, block, "latency", block * 10.0 + i, "ms", t_start=1.0, t_end=2.0)
        for i in range(n)
    ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    with RunStore.create(tmp_path, CONFIG, {}, run_id="run-a") as created:
        yield created


# -- one writer per run -----------------------------------------------------------------------


def test_a_second_create_of_a_live_run_names_the_writer(tmp_path: Path) -> None:
    with holder(tmp_path, "create") as process:
        with pytest.raises(CompoundError) as error:
            RunStore.create(tmp_path, {"c": 2}, {}, run_id="live")
        message = one_line(error)
        assert f"run 'live' in {tmp_path} is being written by process {process.pid}" in message
        assert "pick another --run-id" in message
        # Two processes starting the same run id at once: the second one fails the same way.
        second = subprocess.run(
            [sys.executable, "-c", HOLDER, str(tmp_path), "create"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0 and "ready" not in second.stdout
        assert f"being written by process {process.pid}" in second.stderr
        assert json.loads((tmp_path / "live" / "run.json").read_text())["config"] == {"c": 1}


def test_a_resume_of_a_live_run_is_refused_but_reading_it_works(tmp_path: Path) -> None:
    RunStore.create(tmp_path, CONFIG, {}, run_id="live").close()
    with holder(tmp_path, "open") as process:
        with pytest.raises(CompoundError) as error:
            RunStore.open(tmp_path, "live", writer=True)
        assert f"being written by process {process.pid} (still running)" in one_line(error)
        with pytest.raises(CompoundError, match=f"by process {process.pid}"):
            RunStore.create(tmp_path, CONFIG, {}, run_id="live")
        assert RunStore.open(tmp_path, "live").config == CONFIG  # readers take no lock
        assert load_run(tmp_path / "live").meta["state"] == "running"


def test_a_sigkilled_writer_leaves_the_run_free_to_resume(tmp_path: Path) -> None:
    with holder(tmp_path, "create") as process:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    with RunStore.open(tmp_path, "live", writer=True) as resumed:
        resumed.append_block("baseline", 0, make_block("baseline", 0))
        assert resumed.completed_blocks() == {("baseline", 0)}


def test_close_and_with_release_the_lock_and_end_writing(store: RunStore, tmp_path: Path) -> None:
    with pytest.raises(CompoundError, match="being written by process"):
        RunStore.open(tmp_path, "run-a", writer=True)  # flock conflicts in one process too
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="read-only"):
        store.append_block("baseline", 0, make_block("baseline", 0))
    with RunStore.open(tmp_path, "run-a", writer=True) as resumed:
        resumed.set_state("complete")
    RunStore.open(tmp_path, "run-a", writer=True).close()  # the with block let go


def test_a_reader_may_not_write(store: RunStore, tmp_path: Path) -> None:
    reader = RunStore.open(tmp_path, "run-a")
    for write in (
        lambda: reader.set_state("complete"),
        lambda: reader.update_meta("x", 1),
        lambda: reader.append_block("baseline", 0, []),
        lambda: reader.record_failure("baseline", "boom"),
        lambda: reader.record_extra("note", {}),
        lambda: reader.log_error("boom", "details"),
        lambda: reader.write_text("report.md", "x"),
        reader.repair,
    ):
        with pytest.raises(RuntimeError, match="writer=True"):
            write()
    assert not store.samples_path.exists()


def _sleep(started: Any) -> None:
    started.set()
    time.sleep(60)


def test_workers_do_not_inherit_the_lock(store: RunStore, tmp_path: Path) -> None:
    # Were the lock's descriptor inherited, the children would keep the run locked after close.
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    worker = context.Process(target=_sleep, args=(started,), daemon=True)
    worker.start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], close_fds=False)
    try:
        # Until it runs Python, a spawned child still holds every descriptor (fork, then exec).
        assert started.wait(60)
        store.close()
        assert worker.is_alive() and child.poll() is None
        RunStore.open(tmp_path, "run-a", writer=True).close()
    finally:
        worker.kill()
        worker.join()
        child.kill()
        child.wait()


# -- run.json and the stored configuration ----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m.pop("state"), "lacks the field state; restore it or start a new run"),
        (lambda m: m.update(config=["x"]), "config must be an object, got list"),
        (lambda m: m.update(created=1700000000), "created must be str, got int"),
        (lambda m: m.update(environment=None), "environment must be an object, got null"),
        (lambda m: m.update(state="done"), "state must be one of running, complete, interrupted"),
        (lambda m: m.clear(), "lacks the fields run_id, created, state, config, environment"),
    ],
)
def test_a_damaged_run_json_is_one_line_naming_the_field(
    store: RunStore, tmp_path: Path, change: Any, expected: str
) -> None:
    meta_path = store.path / "run.json"
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))
    for read in (lambda: RunStore.open(tmp_path, "run-a"), lambda: load_run(store.path)):
        with pytest.raises(CompoundError) as error:
            read()
        message = one_line(error)
        assert message.startswith(str(meta_path)) and expected in message
        assert message.endswith("restore it or start a new run")


def test_extra_run_json_fields_are_kept(store: RunStore, tmp_path: Path) -> None:
    store.update_meta("calibration", {"ok": True})
    assert RunStore.open(tmp_path, "run-a").meta["calibration"] == {"ok": True}


SPEC = RunSpec(
    source=ModelSource(preset="tiny", cache_dir="/cache"),
    configurations=(
        Configuration("baseline"),
        Configuration("pruned", (TransformSpec("token_pruning", {"keep": 0.5}),), slowdown=0.05),
    ),
    workload=WorkloadSpec(requests_per_block=4),
    protocol=Protocol(min_rounds=3, max_seconds=30.0),
    transforms=(TransformSpec("token_pruning", {"keep": 0.5}),),
    designs=("singles",),
)


def stored_spec() -> dict[str, Any]:
    return json.loads(json.dumps(SPEC.to_dict()))


def test_a_stored_spec_round_trips() -> None:
    assert RunSpec.from_dict(stored_spec()) == SPEC
    assert RunSpec.from_dict(SPEC.to_dict()) == SPEC  # as the workers get it: tuples, not lists
    older = stored_spec()
    del older["designs"], older["aa_control"]  # fields with defaults may be left out
    assert RunSpec.from_dict(older).designs == ()


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return change


def _drop(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]
        del data[path[-1]]

    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            _set(["protocol", "min_rounds"], "ten"),
            "config.protocol.min_rounds must be int, got str 'ten'",
        ),
        (
            _set(["protocol", "min_rounds"], True),
            "config.protocol.min_rounds must be int, got bool True",
        ),
        (
            _set(["protocol", "min_seconds"], None),
            "config.protocol.min_seconds must be float, got null",
        ),
        (
            _set(["protocol", "max_seconds"], "1h"),
            "config.protocol.max_seconds must be float or null",
        ),
        (
            _set(["protocol", "min_seconds"], float("inf")),
            "config.protocol.min_seconds must be a finite",
        ),
        (
            _set(["protocol", "min_round"], 3),
            "config.protocol.min_round is not a field of Protocol",
        ),
        (_drop(["source"]), "config.source is missing"),
        (_set(["source", "trained"], "yes"), "config.source.trained must be bool, got str 'yes'"),
        (_drop(["configurations", 1, "name"]), "config.configurations[1].name is missing"),
        (
            _set(["configurations", 1, "transforms", 0, "params"], [0.5]),
            "config.configurations[1].transforms[0].params must be an object, got list [0.5]",
        ),
        (_set(["configurations"], {"baseline": {}}), "config.configurations must be a list"),
        (_set(["designs", 0], 7), "config.designs[0] must be str, got int 7"),
        (_set(["workload"], 8), "config.workload must be an object, got int 8"),
    ],
)
def test_a_damaged_stored_spec_is_one_line_naming_the_field_path(
    change: Any, expected: str
) -> None:
    data = stored_spec()
    change(data)
    with pytest.raises(CompoundError) as error:
        RunSpec.from_dict(data, "results/x/run.json")
    message = one_line(error)
    assert message.startswith(f"results/x/run.json: {expected}")
    assert message.endswith("; fix it there or start a new run")


def test_a_resumed_run_with_a_damaged_config_names_its_file(tmp_path: Path) -> None:
    RunStore.create(tmp_path, SPEC.to_dict(), {}, run_id="x").close()
    meta_path = tmp_path / "x" / "run.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["protocol"]["min_rounds"] = "ten"
    meta_path.write_text(json.dumps(meta))
    with RunStore.open(tmp_path, "x", writer=True) as resumed:
        with pytest.raises(CompoundError) as error:
            RunSpec.from_dict(resumed.config, str(meta_path))
    assert one_line(error).startswith(
        f"{meta_path}: config.protocol.min_rounds must be int, got str 'ten'"
    )


# -- a damaged samples.jsonl ------------------------------------------------------------------


def three_blocks(store: RunStore) -> list[bytes]:
    """Blocks 0-2 of 'baseline' (4 lines each) with a failure and an extra between; the lines."""
    store.append_block("baseline", 0, make_block("baseline", 0))
    store.record_failure("other", "did not start")
    store.append_block("baseline", 1, make_block("baseline", 1))
    store.record_extra("note", {"text": "kept"})
    store.append_block("baseline", 2, make_block("baseline", 2))
    return store.samples_path.read_bytes().splitlines(keepends=True)


def test_a_garbage_line_says_how_to_repair(store: RunStore) -> None:
    lines = three_blocks(store)
    lines[6] = b"\x00\x00garbage\n"
    store.samples_path.write_bytes(b"".join(lines))
    with pytest.raises(CompoundError) as error:
        load_run(store.path)
    assert one_line(error) == (
        f"{store.samples_path} line 7 is not valid JSON; {REPAIR_HINT} the blocks they belonged to"
    )
    lines[6] = b'{"kind": "sample", "config": "baseline", "block": 9}\n'
    store.samples_path.write_bytes(b"".join(lines))
    with pytest.raises(CompoundError, match="does not follow its 3 samples; `compound run"):
        store.failures()


def test_repair_drops_exactly_the_damaged_block(store: RunStore) -> None:
    lines = three_blocks(store)
    original = b"".join(lines[:6]) + b"{garbage\n" + b"".join(lines[7:]) + b'{"kind": "sam'
    store.samples_path.write_bytes(original)  # a sample of block 1 damaged, and a cut-off tail
    result = store.repair()
    backup = Path(result.pop("backup"))
    # Dropped: the garbage, block 1's two other samples and its marker, and the cut-off tail.
    assert result == {"lines_dropped": 5, "blocks_kept": 2, "blocks_dropped": 1}
    run = load_run(store.path)
    assert store.completed_blocks() == {("baseline", 0), ("baseline", 2)}
    assert run.samples["value"].tolist() == [0.0, 1.0, 2.0, 20.0, 21.0, 22.0]
    assert run.failures["error"].tolist() == ["did not start"]
    assert [e["text"] for e in run.extras] == ["kept"]
    assert list(store.path.glob("samples.jsonl.damaged-*")) == [backup]
    assert backup.read_bytes() == original
    store.append_block("baseline", 1, make_block("baseline", 1))  # the resume re-runs it
    assert len(load_run(store.path).samples) == 9


def test_repair_drops_a_block_whose_marker_is_damaged(store: RunStore) -> None:
    lines = three_blocks(store)
    lines[8] = b'{"kind": "block_done", "config": "baseline"\n'
    store.samples_path.write_bytes(b"".join(lines))
    result = store.repair()
    assert (result["lines_dropped"], result["blocks_kept"], result["blocks_dropped"]) == (4, 2, 1)
    assert store.completed_blocks() == {("baseline", 0), ("baseline", 2)}


def test_repair_of_an_intact_log_changes_nothing_but_the_backup(store: RunStore) -> None:
    original = b"".join(three_blocks(store))
    result = store.repair()
    assert result["lines_dropped"] == result["blocks_dropped"] == 0
    assert result["blocks_kept"] == 3
    assert store.samples_path.read_bytes() == original
    assert Path(result["backup"]).read_bytes() == original
    assert sorted(p.name for p in store.path.iterdir()) == sorted(
        ["run.json", "samples.jsonl", "writer.lock", Path(result["backup"]).name]
    )
    assert store.completed_blocks() == {("baseline", b) for b in range(3)}


# -- errors.log -------------------------------------------------------------------------------


def test_failure_details_go_to_errors_log(store: RunStore) -> None:
    trace = 'Traceback (most recent call last):\n  File "w.py", line 3\nValueError: bad\n'
    store.record_failure("sparse", "ValueError: bad", 4, detail=trace)
    store.record_failure("pipeline", "needs CUDA", detail="")  # nothing to add: no entry
    store.log_error("loading the model\nfailed", "OSError: no such file\n  at line 2")
    text = store.errors_path.read_text()
    entries = text.split("--- ")[1:]
    assert len(entries) == 2
    head, *body = entries[0].splitlines()
    assert head.endswith(" sparse block 4: ValueError: bad")
    assert "\n".join(body).strip() == trace.strip()
    assert entries[1].splitlines()[0].endswith(" loading the model failed")
    assert "  at line 2" in entries[1]
    assert [f["error"] for f in store.failures()] == ["ValueError: bad", "needs CUDA"]
    assert "Traceback" not in store.samples_path.read_text()


# -- run ids ----------------------------------------------------------------------------------


def test_run_ids_are_bounded_and_not_empty(tmp_path: Path) -> None:
    check_run_id("a" * MAX_RUN_ID_LENGTH)
    long = "a" * 300
    for call in (
        lambda: check_run_id(long),
        lambda: RunStore.create(tmp_path, CONFIG, {}, run_id=long),
        lambda: RunStore.open(tmp_path, long),
    ):
        with pytest.raises(CompoundError) as error:
            call()
        assert (
            one_line(error)
            == "run id 'aaaaaaaaaaaaaaaaaaaa'... is 300 characters long; use at most 100"
        )
    with pytest.raises(CompoundError) as error:
        check_run_id("")
    assert one_line(error).startswith("the run id is empty")
    with pytest.raises(CompoundError, match="invalid run id"):
        check_run_id("-x")
    assert list(tmp_path.iterdir()) == []
