"""`compound runs` lists stored runs; `compound compare RUN_A RUN_B` puts two side by side,
per configuration and metric, with intervals, environment warnings and an optional CI gate
(see `bench.judge.between_runs`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.commands.common import add_json_arg, finite_float, path_arg, print_json
from bench.judge.analysis import COMPARED, primary_samples
from bench.judge.between_runs import changes, environment_differences, gate_crossed
from bench.store import RunStore, list_runs, load_run, resolve_run
from bench.sweep import INDEX
from core.errors import CompoundError

DEFAULT_RESULTS = Path("results")
METRIC_NAMES = {
    "latency": "latency_mean_s",
    "energy": "energy_j",
    "memory": "peak_rss_bytes",
    "gpu-memory": "peak_allocated_bytes",
    "cost": "cost_usd_per_1k",
}
GATE_EXIT = 1  # a crossed gate: the comparison ran, and B is slower than allowed


def register(subparsers: argparse._SubParsersAction) -> None:
    runs = subparsers.add_parser("runs", help="list the stored runs")
    runs.add_argument("--results-dir", type=path_arg, default=DEFAULT_RESULTS)
    add_json_arg(runs)
    runs.set_defaults(handler=list_command)

    compare = subparsers.add_parser(
        "compare", help="compare two stored runs per configuration, with intervals and a gate"
    )
    for name in ("run_a", "run_b"):
        compare.add_argument(
            name,
            metavar=name.upper(),
            help="run id (under --results-dir), run directory, or SWEEP_DIR:CELL (a cell of a "
            "compound sweep, by its index in sweep.json)",
        )
    compare.add_argument("--results-dir", type=path_arg, default=DEFAULT_RESULTS)
    compare.add_argument(
        "--metric",
        action="append",
        default=None,
        metavar="M",
        help=f"metric to compare (repeatable): {', '.join(METRIC_NAMES)} (default all)",
    )
    compare.add_argument(
        "--fail-if-slower",
        type=finite_float,
        default=None,
        metavar="PCT",
        help="exit 1 when a configuration's latency in B is more than PCT%% above A's and the "
        "interval excludes no change",
    )
    add_json_arg(compare)
    compare.set_defaults(handler=compare_command)


def describe_run(path: Path) -> dict[str, Any]:
    """One line of `compound runs`: what a reader needs to pick a run."""
    meta = RunStore.open(path.parent, path.name).meta
    config = meta.get("config", {})
    environment = meta.get("environment", {})
    source = config.get("source", {})
    commit = (environment.get("git") or {}).get("commit") or ""
    return {
        "id": path.name,
        "created": meta.get("created"),
        "state": meta.get("state"),
        "model": source.get("preset") or source.get("model_path"),
        "device": environment.get("device"),
        "commit": commit[:10],
        "configurations": len(config.get("configurations", [])),
        "rounds": meta.get("rounds"),
        "path": str(path),
    }


def list_command(args: argparse.Namespace) -> int:
    if args.results_dir.exists() and not args.results_dir.is_dir():
        raise CompoundError(f"--results-dir {args.results_dir} is not a directory")
    rows = [describe_run(args.results_dir / run_id) for run_id in list_runs(args.results_dir)]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"no runs in {args.results_dir}")
        return 0
    header = ("id", 36), ("created", 25), ("state", 9), ("model", 14), ("device", 7)
    print(" ".join(f"{name:<{width}}" for name, width in header), f"{'commit':<10} configs")
    for row in rows:
        print(
            f"{row['id']:<36} {row['created'] or '-':<25} {row['state'] or '-':<9} "
            f"{str(row['model']):<14} {str(row['device']):<7} {row['commit'] or '-':<10} "
            f"{row['configurations']}"
        )
    return 0


def resolve_reference(reference: str, results_dir: Path) -> Path:
    """A run directory from a run id, a path, or `SWEEP_DIR:CELL` read from the sweep's index."""
    sweep_dir, _, cell = reference.rpartition(":")
    index = Path(sweep_dir).expanduser() / INDEX
    if sweep_dir and cell.isdigit() and index.is_file():
        try:
            cells = json.loads(index.read_text(encoding="utf-8"))["cells"]
            run_id = cells[int(cell)]["run_id"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise CompoundError(f"{index} has no cell {cell}") from None
        return resolve_run(run_id, index.parent)
    return resolve_run(reference, results_dir)


def _metrics(names: list[str] | None) -> tuple[str, ...]:
    if not names:
        return tuple(COMPARED)
    chosen = []
    for name in names:
        metric = METRIC_NAMES.get(name, name)
        if metric not in COMPARED:
            raise CompoundError(
                f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)} (or their sample "
                f"names: {', '.join(COMPARED)})"
            )
        chosen.append(metric)
    return tuple(dict.fromkeys(chosen))


def compare_command(args: argparse.Namespace) -> int:
    metrics = _metrics(args.metric)
    if args.fail_if_slower is not None and args.fail_if_slower < 0:
        raise CompoundError(f"--fail-if-slower must be at least 0, got {args.fail_if_slower:g}")
    path_a, path_b = (resolve_reference(ref, args.results_dir) for ref in (args.run_a, args.run_b))
    run_a, run_b = load_run(path_a), load_run(path_b)
    # each run at its primary batch size (a batch-size difference is among the warnings)
    samples_a, samples_b = (primary_samples(r.meta, r.samples) for r in (run_a, run_b))
    found = changes(samples_a, samples_b, metrics)
    warnings = environment_differences(run_a.meta, run_b.meta)
    crossed = (
        gate_crossed(found, args.fail_if_slower, "latency_mean_s")
        if args.fail_if_slower is not None
        else []
    )
    if args.json:
        print_json(
            {
                "a": str(path_a),
                "b": str(path_b),
                "changes": [c.to_dict() for c in found],
                "environment_differences": warnings,
                "gate": None
                if args.fail_if_slower is None
                else {
                    "slower_pct": args.fail_if_slower,
                    "crossed": [c.config for c in crossed],
                },
            }
        )
    else:
        _print_changes(path_a, path_b, found, warnings)
    if crossed:
        names = ", ".join(f"{c.config} ({-c.delta:+.1%})" for c in crossed)
        print(
            f"compound: gate crossed: latency more than {args.fail_if_slower:g}% higher in B "
            f"for {names}",
            file=sys.stderr,
        )
        return GATE_EXIT
    return 0


def _print_changes(path_a: Path, path_b: Path, found: list, warnings: list[str]) -> None:
    print(f"A: {path_a}\nB: {path_b}")
    for line in warnings:
        print(f"warning: {line}")
    if not found:
        print("no configuration and metric measured in both runs")
        return
    width = max(len(c.config) for c in found)
    print(
        f"{'configuration':<{width}} {'metric':<18} {'A':>11} {'B':>11}  Δ (B vs A, + = lower) "
        "[95% CI]"
    )
    for c in found:
        interval = f"{c.delta:+.1%} [{c.lo:+.1%}, {c.hi:+.1%}]"
        note = "" if c.units == "processes" else "  (rounds as units: one process)"
        print(
            f"{c.config:<{width}} {c.label:<18} {c.a:>11.4g} {c.b:>11.4g}  {interval} "
            f"{c.word}{note}"
        )
