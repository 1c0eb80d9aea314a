"""A model counts as trained only when that is known: our checkpoints say so in compound.json,
and a directory from elsewhere is untrained unless the user says otherwise (`--trained`), so
accuracy is never scored for random weights by accident."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.checkpoint import METADATA_FILE, build_bundle, load_model_dir, save_checkpoint
from tests.test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory) -> Path:
    """A LLaVA checkpoint as another tool writes it: weights and config, no compound.json."""
    path = tmp_path_factory.mktemp("foreign") / "llava"
    build_bundle("tiny").model.save_pretrained(path)
    assert not (path / METADATA_FILE).exists()
    return path


@pytest.fixture(scope="module")
def own_dirs(tmp_path_factory) -> dict[bool, Path]:
    """Our checkpoints, one recorded as trained and one as untrained."""
    root = tmp_path_factory.mktemp("own")
    paths = {}
    for trained in (False, True):
        bundle = build_bundle("tiny")
        bundle.trained = trained
        paths[trained] = root / f"trained-{trained}"
        save_checkpoint(bundle, paths[trained], {})
    return paths


def test_a_foreign_llava_dir_is_untrained_unless_the_caller_says(foreign_dir):
    assert load_model_dir(foreign_dir).trained is False
    assert load_model_dir(foreign_dir, trained=False).trained is False
    vouched = load_model_dir(foreign_dir, trained=True)
    assert vouched.trained is True and vouched.metadata["external"] is True


@pytest.mark.parametrize("recorded", [False, True])
def test_our_checkpoint_keeps_what_its_metadata_says(own_dirs, recorded):
    path = own_dirs[recorded]
    assert json.loads((path / METADATA_FILE).read_text())["trained"] is recorded
    for asked in (False, True):
        loaded = load_model_dir(path, trained=asked)
        assert loaded.trained is recorded and "external" not in loaded.metadata


def _eval_trained(capsys, *argv: str) -> bool:
    code, out, err = run_cli(capsys, "eval", *argv, "--examples", "4", "--json")
    assert code == 0, err
    return json.loads(out)["trained"]


def test_eval_trained_flag_counts_for_foreign_dirs_only(capsys, foreign_dir, own_dirs):
    assert _eval_trained(capsys, "--model", str(foreign_dir)) is False
    assert _eval_trained(capsys, "--model", str(foreign_dir), "--trained") is True
    assert _eval_trained(capsys, "--model", str(own_dirs[False]), "--trained") is False
    assert _eval_trained(capsys, "--model", str(own_dirs[True])) is True


def test_eval_trained_flag_with_a_preset_is_one_line(capsys, isolated_cache):
    code, _, err = run_cli(capsys, "eval", "--preset", "tiny", "--trained")
    assert_one_line_error(code, err, "--trained describes a --model directory")
