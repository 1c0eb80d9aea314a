"""`compound calibrate`: how small a change can this machine resolve in a given time budget?

Runs the baseline against an identical copy of itself (A/A) and against copies slowed by known
amounts, interleaved like any suite. The A/A spread of per-round log ratios gives the minimum
detectable effect (95% confidence, 80% power); the planted slowdowns show whether the harness
recovers effects of known size.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.commands.common import (
    add_json_arg,
    add_model_args,
    positive_int,
    print_json,
    resolve_device,
)
from bench.configuration import Configuration, ModelSource, Protocol, RunSpec
from bench.judge.analysis import block_values
from bench.judge.stats import detects, mde_for_rounds, paired_delta
from bench.measure.environment import collect_environment
from bench.measure.runner import run_rounds
from bench.measure.workload import WorkloadSpec
from bench.store import RunStore, load_run
from core.errors import CompoundError
from models.checkpoint import cache_dir
from models.presets import DEFAULT_PRESET, get_preset
from models.teacher import ensure_trained

METRIC = "latency_mean_s"
DEFAULT_PLANTED = (0.01, 0.02, 0.05)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("calibrate", help="minimum detectable effect for this machine")
    add_model_args(parser)
    parser.add_argument(
        "--budget",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="time budget for the timed rounds (default 120)",
    )
    parser.add_argument(
        "--planted",
        type=float,
        action="append",
        default=None,
        metavar="FRACTION",
        help="known slowdowns to plant (repeatable; default 0.01 0.02 0.05)",
    )
    parser.add_argument("--requests", type=positive_int, default=4, help="requests per block")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="keep the calibration run here (default: a temporary directory)",
    )
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def _configurations(planted: tuple[float, ...]) -> tuple[Configuration, ...]:
    copies = [Configuration(f"slowed+{p:.0%}", slowdown=p) for p in planted]
    return (Configuration("A"), Configuration("A-copy"), *copies)


def calibration_report(
    samples, planted: tuple[float, ...], budget: float, device: str
) -> dict[str, Any]:
    table = block_values(samples, METRIC)
    if "A" not in table or "A-copy" not in table:
        raise CompoundError("calibration produced no paired A/A rounds (all blocks failed?)")
    pair = table[["A", "A-copy"]].dropna()
    log_ratios = np.log(pair["A-copy"].to_numpy() / pair["A"].to_numpy())
    sd = float(np.std(log_ratios, ddof=1)) if len(log_ratios) > 1 else float("nan")
    rounds = len(pair)
    aa = paired_delta(pair["A"].to_numpy(), pair["A-copy"].to_numpy())
    planted_rows = []
    for fraction in planted:
        name = f"slowed+{fraction:.0%}"
        both = table[["A", name]].dropna() if name in table else None
        if both is None or len(both) < 2:
            continue
        estimate = paired_delta(both["A"].to_numpy(), both[name].to_numpy())
        planted_rows.append(
            {
                "planted_slowdown": fraction,
                # Δ = 1 − opt/base (geometric over rounds), so the measured slowdown is −Δ.
                "measured_slowdown": -estimate.point,
                "ci": [-estimate.hi, -estimate.lo],
                "detected": detects(estimate),
            }
        )
    mde = mde_for_rounds(sd, rounds) if rounds > 1 else float("nan")
    return {
        "device": device,
        "budget_s": budget,
        "metric": METRIC,
        "rounds": rounds,
        "aa_delta": aa.point,
        "aa_ci": [aa.lo, aa.hi],
        "log_ratio_sd": sd,
        "mde_pct": 100.0 * mde,
        "mde_definition": "smallest change detected with 95% confidence and 80% power, "
        f"from the A/A per-round log-ratio spread over {rounds} rounds",
        "planted": planted_rows,
    }


def _source(args: argparse.Namespace, device: str) -> ModelSource:
    cache = str(cache_dir(args.cache_dir))
    if args.model is not None:
        return ModelSource(model_path=str(args.model), cache_dir=cache, device=device)
    preset = get_preset(args.preset or DEFAULT_PRESET)
    if not preset.cost_only:
        ensure_trained(preset.name, Path(cache), show_progress=not args.json)
    return ModelSource(preset=preset.name, cache_dir=cache, device=device)


def run(args: argparse.Namespace) -> int:
    if args.budget <= 0:
        raise CompoundError("--budget must be positive")
    planted = tuple(args.planted or DEFAULT_PLANTED)
    if any(not 0 < p < 1 for p in planted):
        raise CompoundError("--planted slowdowns must be fractions in (0, 1), e.g. 0.02")
    device = resolve_device(args.device)
    spec = RunSpec(
        source=_source(args, device),
        configurations=_configurations(planted),
        workload=WorkloadSpec(requests_per_block=args.requests),
        protocol=Protocol(
            min_rounds=10**6,
            min_seconds=0.0,
            max_seconds=args.budget,
            threads=args.threads or torch.get_num_threads(),
            module_pass_every=0,
        ),
    )
    keep = args.results_dir is not None
    results_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="compound-calibrate-"))
    try:
        store = RunStore.create(
            results_dir, spec.to_dict(), collect_environment(torch.device(device))
        )
        console = Console(stderr=True, quiet=args.json)
        with console.status("calibrating") as status:
            run_rounds(spec, store, progress=lambda m: status.update(f"calibrating: {m}"))
        store.set_state("complete")
        report = calibration_report(load_run(store.path).samples, planted, args.budget, device)
        if keep:
            store.update_meta("calibration", report)
            report["run_id"] = store.run_id
    finally:
        if not keep:
            shutil.rmtree(results_dir, ignore_errors=True)
    if args.json:
        print_json(report)
    else:
        _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    console = Console()
    console.print(
        f"calibration on {report['device']}, {report['budget_s']:.0f} s budget, "
        f"{report['rounds']} paired rounds"
    )
    console.print(
        f"A/A: Δ {report['aa_delta']:+.2%} [{report['aa_ci'][0]:+.2%}, "
        f"{report['aa_ci'][1]:+.2%}]; per-round log-ratio sd {report['log_ratio_sd']:.2%}"
    )
    console.print(
        f"minimum detectable effect: {report['mde_pct']:.2f}%  ({report['mde_definition']})"
    )
    table = Table(title="planted slowdowns")
    for column in ("planted", "measured", "95% CI", "detected"):
        table.add_column(column)
    for row in report["planted"]:
        table.add_row(
            f"{row['planted_slowdown']:.1%}",
            f"{row['measured_slowdown']:+.2%}",
            f"[{row['ci'][0]:+.2%}, {row['ci'][1]:+.2%}]",
            "yes" if row["detected"] else "no",
        )
    console.print(table)
