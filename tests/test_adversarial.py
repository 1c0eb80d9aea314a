"""Bad input, tried as a hostile user would: every invocation must end in one line that starts
with `compound`, a non-zero exit, no traceback, nothing left behind, and no work started.

Generated cases (hypothesis) cover every numeric option of every command with values that
must be refused: NaN, infinities, non-numbers, empty strings, values below a lower bound and
above an upper bound or a cap. Hand-written cases cover paths and files. Each invocation runs
in-process with an empty model cache; an alarm fails any that starts real work.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cli import main

WORK_LIMIT_S = 20  # refusing bad input takes milliseconds; real work (training) takes longer


@pytest.fixture()
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache and results directory; the working directory is the sandbox too."""
    monkeypatch.setenv("COMPOUND_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def _on_alarm(signum, frame):  # noqa: ANN001
    raise TimeoutError(f"still working after {WORK_LIMIT_S} s: bad input was not refused first")


def invoke(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(WORK_LIMIT_S)
    try:
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_refused(capsys: pytest.CaptureFixture[str], root: Path, argv: list[str]) -> str:
    """The invocation fails with one clean line and leaves the sandbox as it found it."""
    before = snapshot(root)
    code, out, err = invoke(capsys, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, (argv, out, err)
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith("compound"), (argv, err)
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    assert snapshot(root) == before, (argv, sorted(snapshot(root) - before))
    return lines[0]


# --- generated: every numeric option with values it must refuse -----------------------------

NOT_NUMBERS = ["nan", "NaN", "inf", "-inf", "Infinity", "", " ", "abc", "1e999", "0x10", "½"]


def below(low: float, open_: bool = False) -> st.SearchStrategy[str]:
    """Numbers under a lower bound (or at it, when the bound is open)."""
    top = low if open_ else low - 1e-9
    return st.floats(max_value=top, allow_nan=False, allow_infinity=False).map(repr)


def above(high: float) -> st.SearchStrategy[str]:
    return st.floats(min_value=high * 1.001 + 1, max_value=1e12, allow_nan=False).map(repr)


def ints_below(low: int) -> st.SearchStrategy[str]:
    return st.integers(max_value=low - 1, min_value=-(2**70)).map(str)


def ints_above(high: int) -> st.SearchStrategy[str]:
    return st.integers(min_value=high + 1, max_value=2**70).map(str)


def fractional() -> st.SearchStrategy[str]:
    """Strings an int option must refuse: fractions and exponents."""
    return (
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
        .filter(lambda x: x != int(x))
        .map(repr)
    )


def bad(
    kind: str, low: float | None, high: float | None, *, open_: bool = False
) -> st.SearchStrategy[str]:
    """Values an option of this kind and range must refuse."""
    options = [st.sampled_from(NOT_NUMBERS)]
    if kind == "int":
        options.append(fractional())
        if low is not None:
            options.append(ints_below(int(low)))
        if high is not None:
            options.append(ints_above(int(high)))
    else:
        if low is not None:
            options.append(below(low, open_))
        if high is not None:
            options.append(above(high))
    return st.one_of(options)


# (command, option, kind, low, high, low_open): high is the hard limit or the cap.
NUMERIC_OPTIONS = [
    ("run", "--threads", "int", 1, 1024, False),
    ("run", "--requests", "int", 1, 256, False),
    ("run", "--new-tokens", "int", 1, 512, False),
    ("run", "--min-rounds", "int", 1, 10_000, False),
    ("run", "--eval-examples", "int", 0, 20_000, False),
    ("run", "--seed", "int", 0, 2**32 - 1, False),
    ("run", "--min-seconds", "float", 0, 3600, False),
    ("run", "--budget", "float", 0, 6 * 3600, True),
    ("run", "--watts-per-core", "float", 0, 1000, True),
    ("run", "--price-per-hour", "float", 0, 10_000, False),
    ("run", "--grid-intensity", "float", 0, 2000, False),
    ("run", "--image-fraction", "float", 0, 1, False),
    ("run", "--processes", "int", 1, 200, False),
    ("run", "--margin", "float", 0, 100, True),
    ("run", "--memory-margin-mib", "float", 0, 1_000_000, False),
    ("run", "--memory-margin-pct", "float", 0, 100, False),
    ("calibrate", "--processes", "int", 2, 200, False),
    ("calibrate", "--budget", "float", 0, 3600, True),
    ("calibrate", "--requests", "int", 1, 256, False),
    ("calibrate", "--threads", "int", 1, 1024, False),
    ("calibrate", "--planted", "float", 0, 1, True),
    ("eval", "--examples", "int", 1, 20_000, False),
    ("wrap", "--seed", "int", 0, 2**32 - 1, False),
    ("distill", "--steps", "int", 1, 20_000, False),
    ("distill", "--student-layers", "int", 1, None, False),
    ("distill", "--student-hidden", "int", 1, 65_536, False),
    ("distill", "--temperature", "float", 0, 100, True),
    ("distill", "--alpha", "float", 0, 1, False),
    ("distill", "--attention-weight", "float", 0, 1_000, False),
    ("distill", "--hidden-weight", "float", 0, 1_000, False),
    ("distill", "--epsilon", "float", 0, 1_000, True),
    ("distill", "--delta", "float", 0, 0.01, True),
    ("distill", "--clip-norm", "float", 0, 1_000, True),
    ("attention", "--window", "int", 1, 1_000_000, False),
    ("attention", "--rounds", "int", 3, 1_000, False),
    ("attention", "--calls", "int", 1, 10_000, False),
    ("attention", "--images", "int", 1, 64, False),
]
COMMAND_TAIL = {
    "run": ["--preset", "tiny", "--results-dir", "results"],
    "calibrate": ["--preset", "tiny"],
    "eval": ["--preset", "tiny"],
    "wrap": ["lm", "--out", "out"],
    "distill": ["--preset", "tiny"],
    "attention": ["--preset", "tiny"],
}


@pytest.mark.parametrize(
    ("command", "option", "kind", "low", "high", "low_open"),
    NUMERIC_OPTIONS,
    ids=[f"{c} {o}" for c, o, *_ in NUMERIC_OPTIONS],
)
@settings(
    max_examples=14,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_numeric_options_refuse_bad_values(
    sandbox, capsys, command, option, kind, low, high, low_open, data
):
    value = data.draw(bad(kind, low, high, open_=low_open), label="value")
    if command == "calibrate" and option == "--planted" and value in ("1", "1.0"):
        value = "1.5"
    assert_refused(capsys, sandbox, [command, *COMMAND_TAIL[command], f"{option}={value}"])


# --- transform parameters -------------------------------------------------------------------

BAD_PARAMS = [
    "token_pruning.keep_ratio=NaN",
    "token_pruning.keep_ratio=Infinity",
    "token_pruning.keep_ratio=-0.5",
    "token_pruning.keep_ratio=0",
    "token_pruning.keep_ratio=1.01",
    "token_pruning.keep_ratio=half",
    "token_pruning.layer=-1",
    "token_pruning.layer=1.5",
    "token_pruning.layer=true",
    "token_pruning.layer=99",
    "block_sparse_attention.pattern=stripes",
    "block_sparse_attention.window=0",
    "block_sparse_attention.block_size=24",
    "sparse_finetune.steps=0",
    "sparse_finetune.compensation=NaN",
    "token_pruning.threshold=NaN",
    "token_pruning.threshold=2",
    "token_pruning.ratio=0.5",
    "token_pruning.keep_ratio",
    "keep_ratio=0.5",
    "fused_qkv.fuse_mlp=1",
    "fused_qkv.fuse_mlp=yes",
    "vision_sleep.mode=fast",
    "vision_sleep.mode=null",
    "vision_sleep.keep_projector_awake=0",
    "distill.student=nope",
    "distill.student=",
    "distill.path=3",
    "distill.layers=1",
]


@pytest.mark.parametrize("param", BAD_PARAMS)
def test_bad_transform_parameters_are_refused_before_work(sandbox, capsys, param):
    alone = param.split(".")[0] in ("block_sparse_attention", "sparse_finetune")
    transforms = param.split(".")[0] if alone else "distill,token_pruning,fused_qkv,vision_sleep"
    argv = ["run", "--preset", "tiny", "--transforms", transforms, "--param", param]
    assert_refused(capsys, sandbox, argv)


# --- names, designs, empty strings, flags that do not go together ----------------------------

CASES = [
    ["run", "--preset", ""],
    ["run", "--preset", "nope"],
    ["run", "--preset", "SMALL"],
    ["run", "--transforms", "warp_drive"],
    ["run", "--transforms", "fused_qkv,fused_qkv"],
    ["run", "--transforms", "none", "--param", "fused_qkv.fuse_mlp=true"],
    ["run", "--design", "pairs"],
    ["run", "--design", ""],
    ["run", "--design", ","],
    ["run", "--results-dir", ""],
    ["run", "--cache-dir", ""],
    ["run", "--model", ""],
    ["run", "--run-id", ""],
    ["run", "--run-id", "a/b"],
    ["run", "--run-id", "../up"],
    ["run", "--run-id", "x" * 300],
    ["run", "--run-id", ".hidden"],
    ["run", "--resume", ""],
    ["run", "--resume", "never-ran"],
    ["run", "--resume", "x" * 300],
    ["run", "--resume", "x", "--preset", "tiny"],
    ["run", "--resume", "x", "--requests", "4"],
    ["run", "--resume", "x", "--seed", "0"],
    ["run", "--repair"],
    ["run", "--preset", "tiny", "--model", "somewhere"],
    ["run", "--trained"],
    ["run", "--device", "tpu"],
    ["run", "--device", "cuda"],
    ["run", "--requests"],
    ["run", "--req", "4"],
    ["run", "extra"],
    ["eval", "--preset", ""],
    ["eval", "--trained"],
    ["eval", "--preset", "llava-1.5-7b"],
    ["train", "--preset", ""],
    ["train", "--preset", "llava-1.5-7b"],
    ["calibrate", "--planted", "0"],
    ["calibrate", "--planted", "1"],
    ["calibrate", "--model", "nowhere"],
    ["calibrate", "--preset", ""],
    ["formula"],
    ["formula", "--delta", "abc"],
    ["formula", "--delta", "nan"],
    ["formula", "--delta", "1.5"],
    ["formula", "--delta=-inf"],
    ["formula", "--delta", "10%", "--weight", "0.5"],
    ["formula", "--declared", "=5%"],
    ["formula", "--declared", "hbm"],
    ["formula", "--target", "50%"],
    ["formula", "--per-module", "0", "--target", "-1"],
    ["run", "--transforms", "fused_qkv,distill"],
    ["distill", "--preset", ""],
    ["distill", "--preset", "llava-1.5-7b"],
    ["distill", "--student", "nope"],
    ["distill", "--student", ""],
    ["distill", "--preset", "tiny", "--student-layers", "3"],
    ["distill", "--preset", "tiny", "--student-vision-layers", "9"],
    ["distill", "--preset", "tiny", "--student-hidden", "30"],
    ["distill", "--preset", "tiny", "--delta", "1e-6"],
    ["distill", "--cache-dir", ""],
    ["distill", "extra"],
    ["attention", "--preset", "nope"],
    ["attention", "--pattern", "stripes"],
    ["attention", "--block-size", "24"],
    ["attention", "--images", "2,2"],
    ["wrap", "missing-lm", "--out", "out"],
    ["wrap", "lm"],
    ["transforms", "--bogus"],
    ["models", "extra"],
    ["frobnicate"],
    [],
]


@pytest.mark.parametrize("argv", CASES, ids=[" ".join(a)[:60] or "(nothing)" for a in CASES])
def test_bad_invocations_are_one_line(sandbox, capsys, argv):
    if argv[:2] == ["run", "--device"] and argv[2] == "cuda" and _has_cuda():
        pytest.skip("this machine has CUDA")
    assert_refused(capsys, sandbox, list(argv))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- paths and files ------------------------------------------------------------------------


def test_path_cases(sandbox, capsys):
    file = sandbox / "a-file"
    file.write_text("x")
    not_llava = sandbox / "llama"
    not_llava.mkdir()
    (not_llava / "config.json").write_text(json.dumps({"model_type": "llama"}))
    config_is_dir = sandbox / "config-dir"
    (config_is_dir / "config.json").mkdir(parents=True)
    bad_json = sandbox / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    fifo = sandbox / "fifo-model"
    fifo.mkdir()
    os.mkfifo(fifo / "config.json")
    loop = sandbox / "loop"
    loop.symlink_to(loop)
    cases = [
        ["run", "--preset", "tiny", "--results-dir", str(file)],
        ["run", "--preset", "tiny", "--results-dir", str(file / "below")],
        ["run", "--preset", "tiny", "--cache-dir", str(file)],
        ["calibrate", "--preset", "tiny", "--results-dir", str(file)],
        ["eval", "--preset", "tiny", "--cache-dir", str(file)],
        ["train", "--preset", "tiny", "--cache-dir", str(file)],
        ["eval", "--model", str(sandbox / "missing")],
        ["eval", "--model", str(file)],
        ["eval", "--model", str(sandbox)],
        ["eval", "--model", str(not_llava)],
        ["eval", "--model", str(config_is_dir)],
        ["eval", "--model", str(bad_json)],
        ["eval", "--model", str(fifo)],
        ["run", "--model", str(sandbox / "missing")],
        ["run", "--model", str(fifo)],
        ["calibrate", "--model", str(sandbox / "missing")],
        ["wrap", str(file), "--out", str(sandbox / "w")],
        ["wrap", str(not_llava), "--out", str(file)],
        ["models", "--cache-dir", str(file)],
        ["run", "--preset", "tiny", "--results-dir", str(loop)],
        ["run", "--preset", "tiny", "--cache-dir", str(loop / "below")],
        ["run", "--preset", "tiny", "--results-dir", str(sandbox / ("x" * 300))],
        ["run", "--preset", "tiny", "--results-dir", "/proc/compound-test"],
        ["calibrate", "--preset", "tiny", "--results-dir", "/proc/compound-test"],
        ["train", "--preset", "tiny", "--cache-dir", "/proc/compound-test"],
        ["run", "--preset", "tiny", "--results-dir", str(sandbox), "--run-id", "a-file"],
        ["run", "--preset", "tiny", "--results-dir", str(sandbox), "--run-id", "llama"],
    ]
    for argv in cases:
        assert_refused(capsys, sandbox, argv)


def test_a_run_that_exists_is_not_started_again(sandbox, capsys):
    stored = sandbox / "results" / "taken"
    stored.mkdir(parents=True)
    (stored / "run.json").write_text("{}")
    line = assert_refused(
        capsys,
        sandbox,
        ["run", "--preset", "tiny", "--results-dir", "results", "--run-id", "taken"],
    )
    assert "--resume taken" in line


@pytest.mark.parametrize(
    "damage",
    ["not json", "[]", '{"run_id": "r"}', "missing"],
    ids=["garbage", "a list", "missing keys", "no run.json"],
)
def test_resuming_a_damaged_run_is_one_line(sandbox, capsys, damage):
    run = sandbox / "results" / "r"
    run.mkdir(parents=True)
    if damage != "missing":
        (run / "run.json").write_text(damage)
    assert_refused(capsys, sandbox, ["run", "--resume", "r", "--results-dir", "results"])


def _set(path: str, value: object) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        *parents, last = path.split(".")
        target = config
        for key in parents:
            target = target[key]
        target[last] = value

    return change


STORED_DAMAGE = {
    "negative budget": _set("protocol.max_seconds", -5),
    "negative requests": _set("workload.requests_per_block", -1),
    "no configurations": _set("configurations", []),
    "unknown preset": _set("source.preset", "nosuch"),
    "cache gone": _set("source.cache_dir", "/nonexistent/cache"),
    "unknown transform": lambda c: c["transforms"].append({"name": "nosuch", "params": {}}),
    "unknown device": _set("source.device", "tpu"),
    "zero processes": _set("protocol.processes", 0),
    "margin above 100%": _set("protocol.margin", 5.0),
    "unknown engine": _set("serving.engine", "warp"),
    "batch size zero": _set("serving.batch_sizes", [1, 0]),
    "no batch sizes": _set("serving.batch_sizes", []),
    "unknown dtype": _set("source.dtype", "int8"),
    "negative max_alive": _set("protocol.max_alive", -1),
}
FILE_DAMAGE = ("samples.jsonl a FIFO", "samples.jsonl a directory", "samples.jsonl a link loop")
FILE_DAMAGE += ("writer.lock a FIFO",)


def _stored_run(results: Path, cache: Path) -> Path:
    """A valid stored run of `tiny` (nothing measured yet) to damage."""
    from bench import suite
    from bench.configuration import Protocol, TransformSpec, WorkloadSpec
    from bench.store import RunStore

    source = suite.model_source("tiny", None, cache, "cpu")
    spec = suite.plan(
        source, (TransformSpec("fused_qkv"),), ("singles",), WorkloadSpec(), Protocol()
    )
    RunStore.create(results, spec.to_dict(), {}, "r").close()
    return results / "r"


@pytest.mark.parametrize("damage", [*STORED_DAMAGE, *FILE_DAMAGE])
def test_resuming_a_run_with_damaged_values_or_files_is_one_line_and_changes_nothing(
    sandbox, capsys, tiny_cache, damage
):
    run = _stored_run(sandbox / "results", tiny_cache)
    meta_path = run / "run.json"
    if damage in STORED_DAMAGE:
        meta = json.loads(meta_path.read_text())
        STORED_DAMAGE[damage](meta["config"])
        meta_path.write_text(json.dumps(meta))
    else:
        name, kind = damage.split(" a ")
        target = run / name
        target.unlink(missing_ok=True)
        if kind == "FIFO":
            os.mkfifo(target)
        elif kind == "directory":
            target.mkdir()
        else:
            target.symlink_to(target)
    before = meta_path.read_bytes()
    line = assert_refused(capsys, sandbox, ["run", "--resume", "r", "--results-dir", "results"])
    assert meta_path.read_bytes() == before, line  # refused before the state changed
    if damage in STORED_DAMAGE and damage != "cache gone":
        assert "config." in line, line  # names the field


def test_at_least_two_hundred_bad_invocations_are_tried():
    generated = len(NUMERIC_OPTIONS) * 14  # max_examples per option
    paths = 27 + 1 + 4 + len(STORED_DAMAGE) + len(FILE_DAMAGE)
    assert generated + len(BAD_PARAMS) + len(CASES) + paths >= 200


if sys.platform != "linux":  # os.mkfifo and the alarm guard are POSIX; CI is Linux
    pytestmark = pytest.mark.skip(reason="POSIX only")
