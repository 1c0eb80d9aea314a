"""What `compound sweep SPEC.toml` does: a matrix of suites, each an ordinary `compound run` on
one device, scheduled by Ray across the GPUs and nodes of a Ray cluster (a local one by
default), with an index of the cells that survives a kill.

The spec (TOML):

    name = "tiny-batches"                 # the sweep: runs land in <results-dir>/<name>/
    [run]                                 # compound run flags every cell shares
    preset = "tiny"
    transforms = "fused_qkv,vision_sleep"
    [matrix]                              # one cell per combination of these flags' values
    batch-size = ["1", "4"]
    param = ["token_pruning.keep_ratio=0.25", "token_pruning.keep_ratio=0.5"]

Flags are written without their dashes; `true` gives a bare flag, a list in [run] repeats
it. A cell is one suite, so its interleaved rounds stay on one device: it asks Ray for one GPU
when it runs on CUDA, and for every CPU of a node otherwise (suites on one machine would
otherwise disturb each other's timings). Each cell runs `python -m bench.cli run` in a Ray
task; its run is stored under the sweep directory like any other, so `compound runs`,
`compound compare` and each run's report.html read it. `sweep.json` (the index) is rewritten
after every cell, and a sweep started again skips the cells whose run is complete;
`index.html` links every cell's report with its verdict.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from core.errors import CompoundError
from core.jsonio import json_text

SPEC_KEYS = {"name", "run", "matrix"}
SWEEP_SETS = {"results-dir", "run-id", "resume", "repair", "json", "no-progress"}
INDEX = "sweep.json"
_ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"[A-Za-z0-9._-]{1,80}")


@dataclass
class Cell:
    """One suite of the sweep: its matrix values, its `compound run` flags and its outcome."""

    index: int
    values: dict[str, Any]
    flags: list[str]
    run_id: str
    state: str = "pending"  # pending, complete, failed
    exit_code: int | None = None
    error: str = ""
    node: str = ""
    seconds: float | None = None


@dataclass
class Sweep:
    name: str
    directory: Path
    cells: list[Cell] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cells": [asdict(c) for c in self.cells]}


def _flag_words(key: str, value: Any) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else []
    if isinstance(value, list):
        return [word for item in value for word in _flag_words(key, item)]
    if isinstance(value, str | int | float):
        return [flag, str(value)]
    raise CompoundError(f"flag {key}: {value!r} is not a string, number, boolean or list")


def _slug(values: dict[str, Any]) -> str:
    text = "-".join(f"{k}{v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60].strip("_") or "cell"


def plan(spec_path: Path, results_dir: Path, check: Callable[[list[str]], None]) -> Sweep:
    """The sweep a spec describes; `check` refuses a cell's flags (CompoundError) as
    `compound run` would, before anything runs."""
    try:
        spec = tomllib.loads(spec_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompoundError(f"sweep spec not found: {spec_path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise CompoundError(f"{spec_path} is not valid TOML: {error}") from None
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise CompoundError(f"{spec_path}: unknown key {unknown[0]!r} (known: name, run, matrix)")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CompoundError(f"{spec_path}: name must be letters, digits, '.', '_' or '-'")
    shared, matrix = spec.get("run", {}), spec.get("matrix", {})
    if not isinstance(shared, dict) or not isinstance(matrix, dict):
        raise CompoundError(f"{spec_path}: [run] and [matrix] must be tables")
    for key in [*shared, *matrix]:
        if key.replace("_", "-") in SWEEP_SETS:
            raise CompoundError(f"{spec_path}: {key} is set by the sweep for every cell")
    for key, values in matrix.items():
        if not isinstance(values, list) or not values:
            raise CompoundError(f"{spec_path}: matrix.{key} must be a non-empty list")
    base = [word for key, value in shared.items() for word in _flag_words(key, value)]
    sweep = Sweep(name, Path(results_dir) / name)
    keys = list(matrix)
    for index, combination in enumerate(itertools.product(*(matrix[k] for k in keys))):
        values = dict(zip(keys, combination, strict=True))
        flags = base + [w for key, value in values.items() for w in _flag_words(key, value)]
        try:
            check(flags)
        except CompoundError as error:
            raise CompoundError(f"sweep cell {index} ({' '.join(flags)}): {error}") from None
        sweep.cells.append(Cell(index, values, flags, f"{name}-{index:02d}-{_slug(values)}"))
    return sweep


def _resources(cell: Cell) -> dict[str, float]:
    """One GPU for a CUDA suite, a whole node's CPUs otherwise (see the module docstring)."""
    import ray

    device = next(
        (cell.flags[i + 1] for i, w in enumerate(cell.flags[:-1]) if w == "--device"), "auto"
    )
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" or (device == "auto" and gpus >= 1):
        return {"num_gpus": 1}
    node_cpus = [n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")]
    return {"num_cpus": max(1, int(min(node_cpus, default=1)))}


def _run_cell(flags: list[str], results: str, run_id: str, root: str) -> dict[str, Any]:
    """In a Ray task: one `compound run`, in its own process, as the command line would."""
    import socket
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "bench.cli", "run", *flags]
    command += ["--results-dir", results, "--run-id", run_id, "--no-progress"]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = result.stderr.strip().splitlines()
    return {
        "exit_code": result.returncode,
        "error": lines[-1] if result.returncode and lines else "",
        "node": socket.gethostname(),
        "seconds": time.time() - started,
    }


def _complete(directory: Path, run_id: str) -> bool:
    path = directory / run_id / "run.json"
    try:
        return json.loads(path.read_text()).get("state") == "complete"
    except (OSError, json.JSONDecodeError):
        return False


def write_index(sweep: Sweep) -> None:
    """sweep.json and index.html, atomically: a killed sweep keeps what finished."""
    sweep.directory.mkdir(parents=True, exist_ok=True)
    for name, text in ((INDEX, json_text(sweep.to_dict())), ("index.html", index_html(sweep))):
        staging = sweep.directory / f".{name}.pid{os.getpid()}"
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, sweep.directory / name)


def _verdict_word(directory: Path, run_id: str) -> str:
    try:
        verdict = json.loads((directory / run_id / "verdict.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "-"
    metrics = verdict.get("metrics") or []
    return metrics[0].get("word", "-") if metrics else "no verdict"


def index_html(sweep: Sweep) -> str:
    keys = list(sweep.cells[0].values) if sweep.cells else []
    header = "".join(f"<th>{escape(k)}</th>" for k in [*keys, "run", "state", "latency verdict"])
    rows = []
    for cell in sweep.cells:
        link = f'<a href="{escape(cell.run_id)}/report.html">{escape(cell.run_id)}</a>'
        state = cell.state + (f": {cell.error}" if cell.error else "")
        values = "".join(f"<td>{escape(str(cell.values[k]))}</td>" for k in keys)
        word = escape(_verdict_word(sweep.directory, cell.run_id))
        rows.append(f"<tr>{values}<td>{link}</td><td>{escape(state)}</td><td>{word}</td></tr>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>sweep {escape(sweep.name)}</title></head><body>"
        f"<h1>sweep {escape(sweep.name)}</h1>"
        f'<table id="cells" border="1"><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></body></html>\n"
    )


def run_sweep(
    sweep: Sweep, address: str | None, advance: Callable[[Cell], None] = lambda cell: None
) -> Sweep:
    """Run every cell not yet complete on Ray (a local instance unless `address`)."""
    try:
        import ray
    except ImportError:
        raise CompoundError(
            "compound sweep schedules with Ray: pip install 'compound-bench[sweep]'"
        ) from None
    for cell in sweep.cells:
        if _complete(sweep.directory, cell.run_id):
            cell.state = "complete"
    write_index(sweep)
    pending = [cell for cell in sweep.cells if cell.state != "complete"]
    if not pending:
        return sweep
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    try:
        ray.init(address=address, configure_logging=False, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = address or "a local Ray instance"
        raise CompoundError(f"cannot start or reach {where}: {error}") from None
    try:
        task = ray.remote(_run_cell)
        running = {
            task.options(**_resources(cell)).remote(
                cell.flags, str(sweep.directory), cell.run_id, str(_ROOT)
            ): cell
            for cell in pending
        }
        while running:
            (done,), _ = ray.wait(list(running), num_returns=1)
            cell = running.pop(done)
            outcome = ray.get(done)
            cell.exit_code, cell.error = outcome["exit_code"], outcome["error"]
            cell.node, cell.seconds = outcome["node"], outcome["seconds"]
            complete = cell.exit_code == 0 and _complete(sweep.directory, cell.run_id)
            cell.state = "complete" if complete else "failed"
            write_index(sweep)
            advance(cell)
    finally:
        ray.shutdown()
    return sweep
