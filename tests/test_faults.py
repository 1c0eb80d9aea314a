"""Faults from outside, on the real command: Ctrl-C and a second writer on a live run.

(SIGKILL and resume: tests/test_run.py; torn and garbage lines, repair: tests/test_store*.py;
a save killed midway: tests/test_model_dirs.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli import main
from bench.suite import remembered_interrupt

RUN = ["--preset", "tiny", "--transforms", "none", "--requests", "2", "--new-tokens", "2"]
QUICK = ["--min-seconds", "0", "--threads", "1", "--eval-examples", "0", "--no-progress"]
QUICK += ["--processes", "1"]


def start_run(cache: Path, results: Path, run_id: str, rounds: int) -> subprocess.Popen:
    """`compound run` in its own process group, as a terminal would start it."""
    argv = [sys.executable, "-m", "bench.cli", "run", *RUN, *QUICK]
    argv += ["--min-rounds", str(rounds), "--cache-dir", str(cache)]
    argv += ["--results-dir", str(results), "--run-id", run_id]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def blocks(run_dir: Path) -> list[tuple[str, int]]:
    path = run_dir / "samples.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [(r["config"], r["block"]) for r in records if r["kind"] == "block_done"]


def wait_for_blocks(process: subprocess.Popen, run_dir: Path, count: int) -> None:
    deadline = time.time() + 240
    while len(blocks(run_dir)) < count:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the run stored no blocks in time"
        time.sleep(0.05)


def test_ctrl_c_stops_quietly_with_one_line_and_the_run_resumes(tiny_cache, tmp_path):
    process = start_run(tiny_cache, tmp_path, "c", rounds=120)
    run_dir = tmp_path / "c"
    wait_for_blocks(process, run_dir, 4)
    os.killpg(process.pid, signal.SIGINT)  # the terminal sends Ctrl-C to the whole group
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["compound: interrupted; continue with `compound run --resume c`"], err
    assert json.loads((run_dir / "run.json").read_text())["state"] == "interrupted"
    before = blocks(run_dir)
    code = main(["run", "--resume", "c", "--results-dir", str(tmp_path), "--no-progress"])
    assert code == 0
    after = blocks(run_dir)
    assert after[: len(before)] == before and len(after) == len(set(after))
    assert {b for _, b in after if b >= 0} == set(range(120))


def test_a_second_writer_on_a_live_run_is_refused_naming_the_holder(tiny_cache, tmp_path, capsys):
    process = start_run(tiny_cache, tmp_path, "live", rounds=10_000)
    try:
        wait_for_blocks(process, tmp_path / "live", 2)
        code = main(["run", "--resume", "live", "--results-dir", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0
        assert f"being written by process {process.pid}" in err, err
        code = main(
            ["run", *RUN, "--cache-dir", str(tiny_cache), "--results-dir", str(tmp_path)]
            + ["--run-id", "live"]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0, err
        assert f"being written by process {process.pid}" in err, err
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    stored = blocks(tmp_path / "live")
    assert len(stored) == len(set(stored)), "a block was stored twice"


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_the_lock_dies_with_its_holder(tiny_cache, tmp_path, capsys):
    process = start_run(tiny_cache, tmp_path, "k", rounds=60)
    wait_for_blocks(process, tmp_path / "k", 2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    code = main(["run", "--resume", "k", "--results-dir", str(tmp_path), "--no-progress", "--json"])
    capsys.readouterr()
    assert code == 0  # the killed holder's lock is gone; the resume finishes the run


def test_a_run_whose_every_configuration_fails_reports_it_and_exits_with_one_line(
    tiny_cache, tmp_path, capsys, monkeypatch
):
    """Every worker fails to start (a transform the workers cannot find): the records, a
    report that names each failure with its traceback in errors.log, one line, exit 2."""
    from bench import suite
    from bench.configuration import Configuration, TransformSpec

    real_plan = suite.plan

    def broken_plan(*args, **kwargs):
        spec = real_plan(*args, **kwargs)
        broken = tuple(
            Configuration(c.name, (TransformSpec("no-such-transform"),))
            for c in spec.configurations
        )
        return spec.__class__(**{**spec.__dict__, "configurations": broken})

    monkeypatch.setattr(suite, "plan", broken_plan)
    monkeypatch.setattr(suite, "check", lambda *args, **kwargs: None)  # no parent-side checks
    code = main(
        ["run", *RUN, *QUICK, "--cache-dir", str(tiny_cache), "--min-rounds", "2"]
        + ["--results-dir", str(tmp_path), "--run-id", "all-fail"]
    )
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("compound: error: every configuration failed")
    assert "Traceback" not in captured.err + captured.out
    run = tmp_path / "all-fail"
    report = (run / "report.md").read_text()
    assert "no verdict" in report or "failed or rejected: baseline" in report
    assert "failed or rejected: baseline: " in report
    assert "unknown transform 'no-such-transform'" in (run / "errors.log").read_text()
    assert json.loads((run / "run.json").read_text())["state"] == "complete"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing
def test_an_interrupt_a_finalizer_swallowed_is_still_remembered():
    class InterruptedWhileDeleted:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # its KeyboardInterrupt is printed and ignored

    before = signal.getsignal(signal.SIGINT)
    with remembered_interrupt() as interrupted:
        assert not interrupted()
        InterruptedWhileDeleted()
        assert interrupted()
    # restored to what it was (once, in a full local run, an earlier test had left SIG_IGN)
    assert signal.getsignal(signal.SIGINT) is before
