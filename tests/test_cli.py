"""The `compound` command: happy paths, and errors as one clear line with a non-zero exit."""

from __future__ import annotations

import json

import pytest

from bench.cli import main
from models.checkpoint import build_bundle, checkpoint_path, save_checkpoint
from models.presets import get_preset


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_models_lists_presets_with_sizes_and_status(capsys, isolated_cache):
    code, out, _ = run_cli(capsys, "models", "--json")
    assert code == 0
    presets = {row["preset"]: row for row in json.loads(out)["presets"]}
    assert set(presets) == {"tiny", "small", "small-hd", "smolvlm-256m", "llava-1.5-7b"}
    assert presets["llava-1.5-7b"]["kind"].startswith("cost-only")
    assert presets["small"]["kind"] == "trained" and not presets["small"]["checkpoint_cached"]
    assert presets["tiny"]["params"] <= 3_000_000
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "llava-1.5-7b" in out


def test_unknown_preset_is_one_line(capsys, isolated_cache):
    for command in ("eval", "train", "run"):
        code, _, err = run_cli(capsys, command, "--preset", "nope")
        assert_one_line_error(code, err, "unknown preset 'nope'")


def test_eval_without_checkpoint_is_one_line(capsys, isolated_cache):
    code, _, err = run_cli(capsys, "eval", "--preset", "tiny")
    assert_one_line_error(code, err, "compound train --preset tiny")


def test_eval_with_corrupt_checkpoint_is_one_line(capsys, isolated_cache):
    path = checkpoint_path(get_preset("tiny"), isolated_cache)
    save_checkpoint(build_bundle("tiny"), path, {})
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = run_cli(capsys, "eval", "--preset", "tiny")
    assert_one_line_error(code, err, "cannot load weights")


def test_bad_model_path_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "not a directory")
    code, _, err = run_cli(
        capsys,
        "run",
        "--model",
        str(tmp_path / "nowhere"),
        "--results-dir",
        str(tmp_path / "results"),
    )
    assert_one_line_error(code, err, "not a directory")


def test_bad_option_value_is_one_line(capsys):
    code, _, err = run_cli(capsys, "run", "--image-fraction", "2")
    assert_one_line_error(code, err, "fraction")
    code, _, err = run_cli(capsys, "run", "--preset", "tiny", "--model", "x")
    assert_one_line_error(code, err, "not allowed with argument")


def test_eval_json_reports_accuracy_by_type(capsys, tiny_cache):
    code, out, _ = run_cli(
        capsys,
        "eval",
        "--preset",
        "tiny",
        "--cache-dir",
        str(tiny_cache),
        "--examples",
        "80",
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["preset"] == "tiny" and report["trained"] is True
    assert report["params"] == build_bundle("tiny").param_count()
    assert set(report["accuracy"]) == {"image", "text"}
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())


def test_train_reuses_the_cached_checkpoint(capsys, tiny_cache):
    code, out, _ = run_cli(
        capsys, "train", "--preset", "tiny", "--cache-dir", str(tiny_cache), "--json"
    )
    assert code == 0
    assert json.loads(out)["trained_now"] is False


def test_train_refuses_cost_only_presets(capsys, isolated_cache):
    code, _, err = run_cli(capsys, "train", "--preset", "llava-1.5-7b")
    assert_one_line_error(code, err, "cost-only")


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (("formula",), "nothing to compute: give --delta"),
        (("calibrate", "--preset", "tiny", "--budget", "0"), "--budget must be > 0, got 0"),
    ],
)
def test_other_input_errors(capsys, isolated_cache, argv, fragment):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_resume_with_other_model_options_is_refused(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "run", "--resume", "x", "--preset", "tiny", "--results-dir", str(tmp_path)
    )
    assert_one_line_error(
        code, err, "--resume continues run 'x' as it was configured; drop --preset"
    )
    code, _, err = run_cli(capsys, "run", "--resume", "missing", "--results-dir", str(tmp_path))
    assert_one_line_error(code, err, "missing")


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        ((), "compound: error:"),
        (("frobnicate",), "compound: error:"),
        (("run", "--requests", "0"), "compound run: error:"),
        (("run", "--no-such-flag"), "compound run: error:"),
        (("formula", "--delta"), "compound formula: error:"),
        (("wrap",), "compound wrap: error:"),
    ],
)
def test_usage_errors_are_one_line_that_says_where_help_is(capsys, argv, prefix):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, prefix)
    assert err.startswith(prefix) and err.rstrip().endswith("--help)")
