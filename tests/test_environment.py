"""Tests for the run environment record."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.measure.environment as environment
from bench.measure.environment import collect_environment
from tests.test_trackers_memory_energy import FakeNvml


def test_collect_environment_has_keys_and_is_json() -> None:
    env = collect_environment(torch.device("cpu"), seed=7)
    assert set(env) >= {
        "versions",
        "platform",
        "hostname",
        "cpu",
        "device",
        "gpu",
        "git",
        "timestamp_utc",
        "seed",
    }
    assert set(env["versions"]) == {"python", "torch", "transformers", "numpy", "pandas"}
    assert env["versions"]["torch"] == torch.__version__
    assert env["cpu"]["torch_threads"] == torch.get_num_threads()
    assert env["cpu"]["logical_cpus"] >= 1
    assert env["gpu"] is None and env["seed"] == 7 and env["device"] == "cpu"
    assert env["timestamp_utc"].endswith("+00:00")
    assert json.loads(json.dumps(env)) == env


def _in_a_git_checkout() -> bool:
    """Whether the project root is a git checkout this test can read (CI runs a fresh clone)."""
    return (environment.PROJECT_ROOT / ".git").exists() and shutil.which("git") is not None


def test_git_commit_is_a_full_hash_in_a_checkout_and_none_outside() -> None:
    git = collect_environment(torch.device("cpu"))["git"]
    if not _in_a_git_checkout():
        assert git == {"commit": None, "dirty": None}
        return
    commit = git["commit"]
    assert isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit), git
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=environment.PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert commit == head
    assert isinstance(git["dirty"], bool)


def test_not_a_git_checkout_gives_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(environment, "PROJECT_ROOT", tmp_path)
    assert environment.git_state() == {"commit": None, "dirty": None}


def test_gpu_fields_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu = collect_environment(torch.device("cuda", 0))["gpu"]
    assert gpu["driver_version"] == "550.54.15"
    assert gpu["cuda_driver_version"] == 12040
    assert (gpu["sm_clock_mhz"], gpu["mem_clock_mhz"], gpu["sm_clock_max_mhz"]) == (
        1980,
        2619,
        1980,
    )
    assert gpu["power_limit_w"] == 700.0
    json.dumps(gpu)


def test_gpu_fields_are_none_when_nvml_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    env = collect_environment(torch.device("cuda", 0))
    assert env["gpu"]["driver_version"] is None and env["gpu"]["power_limit_w"] is None
    json.dumps(env)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_gpu_environment() -> None:
    gpu = collect_environment(torch.device("cuda", 0))["gpu"]
    assert gpu["name"] == torch.cuda.get_device_name(0)
    assert gpu["driver_version"] is not None and gpu["sm_clock_mhz"] > 0
