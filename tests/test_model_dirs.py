"""Hostile model directories and caches: each is refused in one line that names the culprit.

Nothing here trains: an untrained `tiny` checkpoint saved once stands in for every directory,
and for a cached preset when it is saved under the preset's checkpoint path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from bench.cli import main
from core.errors import CompoundError
from models import teacher
from models.checkpoint import (
    METADATA_FILE,
    build_bundle,
    check_cache_dir,
    checkpoint_path,
    load_model_dir,
    load_trained,
    save_checkpoint,
)
from models.presets import get_preset
from models.teacher import ensure_trained

TINY_KEY_NAME = checkpoint_path(get_preset("tiny"), Path("cache")).name


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """An untrained `tiny` checkpoint of ours, to copy and damage."""
    path = tmp_path_factory.mktemp("saved") / "tiny"
    save_checkpoint(build_bundle("tiny"), path, {})
    return path


@pytest.fixture()
def ckpt(saved, tmp_path) -> Path:
    """A private copy of the checkpoint."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


@pytest.fixture()
def cached(saved, isolated_cache) -> Path:
    """The checkpoint as the cache holds the `tiny` preset's."""
    path = checkpoint_path(get_preset("tiny"), isolated_cache)
    shutil.copytree(saved, path)
    return path


@pytest.fixture()
def no_training(monkeypatch) -> None:
    """Training would take tens of seconds: a test that reaches it has already failed."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(teacher, "train_and_save", refuse)


@pytest.fixture()
def deadline() -> Iterator[None]:
    """Fail instead of hanging when a read blocks (opening a FIFO waits for a writer)."""

    def expire(_signum, _frame):
        raise TimeoutError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli_error(capsys, *argv: str) -> str:
    """The one stderr line of a command that must fail as a user error."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("compound") and "Traceback" not in err
    return lines[0]


def load_error(path: Path) -> str:
    with pytest.raises(CompoundError) as caught:
        load_model_dir(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def edit_config(directory: Path, **text_config) -> None:
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"].update(text_config)
    config_file.write_text(json.dumps(config))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# --- 1. files that are not regular files ------------------------------------------------------


def test_a_config_that_is_a_directory_is_named(capsys, ckpt):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    line = cli_error(capsys, "eval", "--model", str(ckpt))
    assert f"{ckpt / 'config.json'} must be a regular file, not a directory" in line


@pytest.mark.parametrize("name", ["config.json", METADATA_FILE, "tokenizer.json"])
def test_a_directory_where_a_file_is_read_is_refused(ckpt, name):
    (ckpt / name).unlink()
    (ckpt / name).mkdir()
    assert f"{ckpt / name} must be a regular file, not a directory" in load_error(ckpt)


@pytest.mark.parametrize(
    "name", ["config.json", METADATA_FILE, "tokenizer.json", "model.safetensors"]
)
def test_a_fifo_is_refused_without_blocking(ckpt, deadline, name):
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    assert f"{ckpt / name} must be a regular file, not a FIFO" in load_error(ckpt)


# --- 2. tokenizers: one line when broken, silent otherwise -------------------------------------


def test_a_garbage_tokenizer_is_one_line(capsys, ckpt):
    (ckpt / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    line = cli_error(capsys, "eval", "--model", str(ckpt))
    assert f"cannot load the tokenizer in {ckpt}" in line and "added_tokens" in line


def test_our_checkpoint_without_tokenizer_files_is_one_line(capsys, ckpt):
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer_config.json").unlink()
    line = cli_error(capsys, "eval", "--model", str(ckpt))
    assert f"checkpoint tokenizer is missing: {ckpt / 'tokenizer.json'}" in line


def test_a_foreign_garbage_tokenizer_says_how_to_fall_back(ckpt):
    (ckpt / METADATA_FILE).unlink()
    (ckpt / "tokenizer.json").write_text("[]")
    message = load_error(ckpt)
    assert f"cannot load the tokenizer in {ckpt}" in message
    assert "remove its tokenizer files" in message


@pytest.mark.parametrize("foreign", [False, True], ids=["ours", "foreign-without-tokenizer"])
def test_loading_logs_nothing_and_leaves_logging_as_it_was(ckpt, capfd, caplog, foreign):
    if foreign:  # falls back to our word tokenizer, without asking the library first
        for name in (METADATA_FILE, "tokenizer.json", "tokenizer_config.json"):
            (ckpt / name).unlink()
    library = logging.getLogger("transformers")  # its records do not reach the root logger
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()  # a caller that wants transformers' chatter elsewhere
    library.addHandler(caplog.handler)
    try:
        bundle = load_model_dir(ckpt)
        assert hf_logging.get_verbosity() == hf_logging.INFO  # ours only during our call
    finally:
        library.removeHandler(caplog.handler)
        hf_logging.set_verbosity(level)
    assert bundle.metadata.get("external", False) is foreign
    assert not caplog.records, [record.getMessage() for record in caplog.records]
    assert capfd.readouterr().err == ""


# --- 3. weights that do not fit the config ----------------------------------------------------


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(capsys, ckpt):
    edit_config(ckpt, intermediate_size=256)
    line = cli_error(capsys, "eval", "--model", str(ckpt))
    assert "model.language_model.layers.0.mlp.down_proj.weight" in line
    assert "[64, 192] in the weights but the config makes it [64, 256]" in line
    assert "above report" not in line


def test_weights_missing_for_the_config_are_named(ckpt):
    edit_config(ckpt, num_hidden_layers=3)
    message = load_error(ckpt)
    assert "lack 9 tensor(s)" in message and "layers.2." in message


# --- 4. invalid text_config: a complete line that names the field ------------------------------


def test_a_bad_text_config_value_names_the_field(capsys, ckpt):
    edit_config(ckpt, hidden_size="big")
    line = cli_error(capsys, "eval", "--model", str(ckpt))
    assert f"invalid model config {ckpt / 'config.json'}: text_config:" in line
    assert "'hidden_size' expected int, got str (value: 'big')" in line


def test_an_unknown_model_type_is_one_complete_sentence(capsys, ckpt):
    edit_config(ckpt, model_type="nosuch")
    line = cli_error(capsys, "eval", "--model", str(ckpt))
    assert line.endswith("text_config: Unrecognized model type for subconfig: nosuch.")


# --- 5. staging directories left by killed saves -----------------------------------------------


def stage(checkpoints: Path, suffix: str, *, age_s: float = 0.0) -> Path:
    path = checkpoints / f".{TINY_KEY_NAME}-{suffix}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"half")
    if age_s:
        stamp = path.stat().st_mtime - age_s
        os.utime(path, (stamp, stamp))
    return path


@pytest.mark.parametrize("via", ["load_trained", "ensure_trained", "save_checkpoint"])
def test_stale_staging_dirs_go_and_live_ones_stay(cached, isolated_cache, no_training, via):
    checkpoints = cached.parent
    dead = stage(checkpoints, f"pid{dead_pid()}-k2j4h5g6")
    live = stage(checkpoints, f"pid{os.getpid()}-k2j4h5g6")
    old_stale = stage(checkpoints, "abcdefgh", age_s=7200)
    old_recent = stage(checkpoints, "ijklmnop")
    if via == "load_trained":
        load_trained("tiny", isolated_cache)
    elif via == "ensure_trained":
        ensure_trained("tiny", isolated_cache, show_progress=False)
    else:
        save_checkpoint(build_bundle("tiny"), cached, {})
    assert not dead.exists() and not old_stale.exists()
    assert live.exists() and old_recent.exists() and cached.is_dir()


def test_a_save_stages_under_its_pid(cached, monkeypatch):
    staged = []
    replace = os.replace

    def record(source, target):
        staged.append(Path(source).name)
        replace(source, target)

    monkeypatch.setattr(os, "replace", record)
    save_checkpoint(build_bundle("tiny"), cached, {})
    assert len(staged) == 1 and staged[0].startswith(f".{cached.name}-pid{os.getpid()}-")


# --- 6. a damaged cached checkpoint says how to rebuild it ---------------------------------------


@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_damaged_cached_checkpoint_says_how_to_rebuild(capsys, cached, no_training, command):
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = cli_error(capsys, command, "--preset", "tiny", "--cache-dir", str(cached.parent.parent))
    assert f"cannot load weights from {cached}" in line
    assert line.endswith("; `compound train --preset tiny --force` rebuilds it")


def test_saving_over_a_file_where_the_checkpoint_goes_replaces_it(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("not a checkpoint")
    save_checkpoint(build_bundle("tiny"), target, {})
    assert load_model_dir(target).preset == "tiny"


# --- 7. a cache directory that cannot work -------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--preset", "tiny"],
        ["eval", "--preset", "tiny"],
        ["run", "--preset", "tiny", "--no-aa-control", "--no-progress"],
    ],
    ids=["train", "eval", "run"],
)
def test_a_cache_that_is_a_file_fails_before_any_work(capsys, tmp_path, no_training, argv):
    cache = tmp_path / "cache"
    cache.write_text("")
    if argv[0] == "run":
        argv = [*argv, "--results-dir", str(tmp_path / "results")]
    line = cli_error(capsys, *argv, "--cache-dir", str(cache))
    assert str(cache) in line and "not a directory" in line


def test_check_cache_dir_refuses_what_cannot_work(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(CompoundError, match="cache path is empty"):
        check_cache_dir("", writable=False)
    with pytest.raises(CompoundError, match=f"{a_file} exists and is not a directory"):
        check_cache_dir(a_file, writable=False)
    with pytest.raises(CompoundError, match=f"{a_file} is not a directory, so"):
        check_cache_dir(a_file / "cache", writable=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "checkpoints").write_text("")
    with pytest.raises(CompoundError, match="checkpoints exists and is not a directory"):
        check_cache_dir(tmp_path / "cache", writable=False)
    check_cache_dir(tmp_path / "new" / "cache", writable=True)  # created when first written
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)  # root may write anywhere
    check_cache_dir(tmp_path / "new", writable=False)
    with pytest.raises(CompoundError, match=f"{tmp_path} is not writable"):
        check_cache_dir(tmp_path / "new", writable=True)
