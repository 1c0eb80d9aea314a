"""`compound sweep`: a spec's matrix of suites, checked before anything runs, run through a
local Ray instance, indexed, resumed, and read back by `compound compare`."""

from __future__ import annotations

import json

import pytest

from bench.cli import main

SPEC = """
name = "tiny-batches"
[run]
preset = "tiny"
transforms = "none"
requests = 3
new-tokens = 2
min-rounds = 3
min-seconds = 0
threads = 1
processes = 2
eval-examples = 0
no-aa-control = true
cache-dir = "{cache}"
[matrix]
batch-size = ["1", "2"]
"""


def test_a_two_cell_sweep_through_local_ray(tiny_cache, tmp_path, capsys):
    pytest.importorskip("ray", reason="compound sweep needs Ray (pip install ray)")
    spec = tmp_path / "sweep.toml"
    spec.write_text(SPEC.format(cache=tiny_cache))
    results = tmp_path / "results"
    assert main(["sweep", str(spec), "--results-dir", str(results), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cells = report["cells"]
    assert [c["state"] for c in cells] == ["complete", "complete"]
    assert [c["values"] for c in cells] == [{"batch-size": "1"}, {"batch-size": "2"}]
    directory = results / "tiny-batches"
    index = json.loads((directory / "sweep.json").read_text())
    assert [c["run_id"] for c in index["cells"]] == [c["run_id"] for c in cells]
    html = (directory / "index.html").read_text()
    assert all(f"{c['run_id']}/report.html" in html for c in cells)
    for cell in cells:
        stored = json.loads((directory / cell["run_id"] / "run.json").read_text())
        assert stored["state"] == "complete"
        assert stored["config"]["serving"]["batch_sizes"] == [int(cell["values"]["batch-size"])]
    # the runs are ordinary runs: compare reads them, and warns that batch sizes differ
    assert main(["compare", f"{directory}:0", f"{directory}:1", "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["environment_differences"]
    assert any(w.startswith("batch sizes: ") for w in warnings)
    # started again, a sweep keeps what is complete and runs nothing
    assert main(["sweep", str(spec), "--results-dir", str(results), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["cells"]
    assert [c["state"] for c in again] == ["complete", "complete"]
    assert all(c["node"] == "" for c in again)  # nothing ran this time


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('name = "x"\n[matrix]\nbatch-size = ["1", "0"]', "sweep cell 1 (--batch-size 0)"),
        ('name = "x"\n[run]\nrun-id = "mine"', "set by the sweep"),
        ('name = "x"\nspeed = 3', "unknown key 'speed'"),
        ('name = "a b"', "name must be"),
        ("name = ", "not valid TOML"),
        ('name = "x"\n[matrix]\nengine = []', "non-empty list"),
    ],
)
def test_bad_specs_fail_before_anything_runs(tmp_path, capsys, spec, message):
    path = tmp_path / "bad.toml"
    path.write_text(spec)
    assert main(["sweep", str(path), "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
