"""`compound formula`: the paper's compounding formulas on numbers typed at the command line.

Examples::

    compound formula --delta 0.10 --delta 15%          # eq 4.2: Δ_total = 23.5%
    compound formula --delta 10% --delta 15% --weight 0.6 --weight 0.4   # adds eq 4.3: 12%
    compound formula --delta 2% --declared hbm=1%      # a declared (unmeasured) module, marked
    compound formula --per-module 1%                   # modules for 50% gain / 20% cost cut
    compound formula --paper                           # the paper's worked numbers vs ours

`--delta` is for measured savings, `--declared NAME=X` for figures nobody measured (for example
the paper's hardware rows); every line and JSON field that depends on a declared input says so.
Weights pair with the inputs (`--delta` and `--declared` together) in command-line order.
Numbers are fractions (0.10) or percentages (10%); write a negative one as `--delta=-5%`.

`--json` prints one object with these keys (null when not asked for):

- ``inputs``: list of ``{"name", "delta", "weight", "source"}``; source is measured or declared;
  ``--delta`` inputs are named d1, d2, ... in order.
- ``declared_inputs``: names of the declared inputs (empty list when none).
- ``independent``: ``{"equation": "4.2", "delta_total", "declared_inputs"}``.
- ``weighted``: ``{"equation": "4.3", "delta_total", "weights", "declared_inputs"}``;
  null unless weights were given.
- ``modules_needed``: ``{"per_module_saving", "readings": {reading: meaning}, "targets": [
  {"target", "label", "resource-saving", "speed-up", "growth"}]}``; a count is null when the
  target cannot be reached.
- ``paper_examples``: list of ``{"name", "formula", "inputs", "paper_text", "paper_printed",
  "computed", "agrees", "note"}``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from bench.commands.common import parse_fraction, print_json
from bench.judge.formulas import (
    PAPER_EXAMPLES,
    READINGS,
    CompoundResult,
    ModuleSaving,
    compound_modules,
    modules_needed,
)
from core.errors import CompoundError
from core.units import pct

DEFAULT_TARGETS: tuple[tuple[float, str], ...] = (
    (0.50, "efficiency gain, the paper's claim"),
    (0.20, "cost cut, the paper's claim"),
)
"""Targets shown when only --per-module is given: the paper's two headline claims."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "formula",
        help="compound savings with the paper's formulas (eq 4.2, 4.3) and check its examples",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--delta",
        dest="inputs",
        action="append",
        default=[],
        metavar="X",
        type=lambda text: ("measured", text),
        help="a measured saving, 0.10 or 10%% (repeatable); compounded by eq 4.2",
    )
    parser.add_argument(
        "--declared",
        dest="inputs",
        action="append",
        metavar="NAME=X",
        type=lambda text: ("declared", text),
        help="a declared (unmeasured) module saving, marked declared everywhere (repeatable)",
    )
    parser.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="W",
        help="module weight, one per input in order, summing to 1; adds eq 4.3 (repeatable)",
    )
    parser.add_argument(
        "--per-module",
        metavar="S",
        help="saving of each module: how many equal modules reach each --target",
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="T",
        help="target for --per-module (repeatable; default 50%% gain and 20%% cost cut)",
    )
    parser.add_argument("--paper", action="store_true", help="show the paper's worked examples")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.set_defaults(handler=handle)


# --- parsing ----------------------------------------------------------------------------------


def number(text: str, option: str) -> float:
    """'0.10' or '10%' → 0.1; anything else is a one-line user error naming the option."""
    try:
        return parse_fraction(text)
    except ValueError:
        raise CompoundError(
            f"bad number {text!r} for {option}: "
            "expected a fraction like 0.10 or a percentage like 10%"
        ) from None


def _modules(args: argparse.Namespace) -> list[ModuleSaving]:
    """Inputs in command-line order, so weights can pair with them one to one."""
    weights = [number(w, "--weight") for w in args.weight]
    if weights and len(weights) != len(args.inputs):
        raise CompoundError(
            f"got {len(weights)} --weight for {len(args.inputs)} inputs (--delta/--declared); "
            "give one weight per input, in the same order"
        )
    modules = []
    for index, (source, text) in enumerate(args.inputs):
        if source == "declared":
            name, sep, value = text.partition("=")
            if not (sep and name.strip()):
                raise CompoundError(f"bad --declared {text!r}: expected NAME=X, e.g. hbm=1%")
            name, delta = name.strip(), number(value, f"--declared {name.strip()}")
        else:
            name, delta = f"d{index + 1}", number(text, "--delta")
        weight = weights[index] if weights else None
        modules.append(ModuleSaving(name=name, delta=delta, weight=weight, source=source))
    return modules


def _targets(args: argparse.Namespace) -> list[tuple[float, str | None]]:
    if args.target and args.per_module is None:
        raise CompoundError("--target needs --per-module S (the saving of each module)")
    if not args.target:
        return list(DEFAULT_TARGETS)
    return [(number(text, "--target"), None) for text in args.target]


# --- building the report ----------------------------------------------------------------------


def _needed(per_module: float, targets: list[tuple[float, str | None]]) -> dict[str, Any]:
    rows = [
        {"target": target, "label": label}
        | {reading: modules_needed(per_module, target, reading) for reading in READINGS}
        for target, label in targets
    ]
    return {"per_module_saving": per_module, "readings": dict(READINGS), "targets": rows}


def _compound_fields(result: CompoundResult | None) -> dict[str, Any]:
    if result is None:
        return {"independent": None, "weighted": None}
    declared = list(result.declared_inputs)
    weighted = None
    if result.weighted is not None:
        weighted = {
            "equation": "4.3",
            "delta_total": result.weighted,
            "weights": [m.weight for m in result.inputs],
            "declared_inputs": declared,
        }
    independent = {
        "equation": "4.2",
        "delta_total": result.independent,
        "declared_inputs": declared,
    }
    return {"independent": independent, "weighted": weighted}


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command shows, as the JSON object documented in the module docstring."""
    modules = _modules(args)
    if args.weight and not modules:
        raise CompoundError("--weight needs --delta or --declared inputs to pair with")
    targets = _targets(args)
    if not (modules or args.per_module is not None or args.paper):
        raise CompoundError("nothing to compute: give --delta, --declared, --per-module or --paper")
    result = compound_modules(modules) if modules else None
    needed = None
    if args.per_module is not None:
        needed = _needed(number(args.per_module, "--per-module"), targets)
    return {
        "inputs": [asdict(m) for m in modules],
        "declared_inputs": [m.name for m in modules if m.source == "declared"],
        **_compound_fields(result),
        "modules_needed": needed,
        "paper_examples": [asdict(e) for e in PAPER_EXAMPLES] if args.paper else None,
    }


# --- text output ------------------------------------------------------------------------------


def _percent(value: float, places: int = 4, signed: bool = False) -> str:
    """0.235 → '23.5%': a number the user typed, to its own precision (trailing zeros dropped)."""
    return pct(value, places, signed=signed, trim=True)


def _total_line(equation: str, kind: str, fields: dict[str, Any]) -> str:
    """One prominent result line; says when the total is a regression or rests on declared input."""
    total = fields["delta_total"]
    line = f"eq {equation}  {kind:<11}  Δ_total = {_percent(total)}"
    if total < 0:
        line += "  (a regression)"
    if fields["declared_inputs"]:
        line += f"  [includes declared: {', '.join(fields['declared_inputs'])}]"
    return line


def _compound_lines(report: dict[str, Any]) -> list[str]:
    lines = ["inputs"]
    lines += [
        f"  {m['name']:<12} {_percent(m['delta']):>10}"
        + (f"  weight {m['weight']:g}" if m["weight"] is not None else "")
        + f"  {m['source']}"
        for m in report["inputs"]
    ]
    lines.append(_total_line("4.2", "independent", report["independent"]))
    if report["weighted"] is not None:
        lines.append(_total_line("4.3", "weighted", report["weighted"]))
    return lines


def _needed_lines(needed: dict[str, Any]) -> list[str]:
    lines = [f"modules needed, each independently saving {_percent(needed['per_module_saving'])}:"]
    for row in needed["targets"]:
        label = f" ({row['label']})" if row["label"] else ""
        counts = "  ".join(
            f"{reading} {row[reading] if row[reading] is not None else 'unreachable'}"
            for reading in READINGS
        )
        lines.append(f"  target {_percent(row['target'])}{label}:  {counts}")
    lines.append("readings (s = per-module saving, n = modules):")
    lines += [f"  {reading:<16} {meaning}" for reading, meaning in needed["readings"].items()]
    return lines


def _paper_lines(examples: list[dict[str, Any]]) -> list[str]:
    lines = ["paper's worked examples (printed by the paper vs computed here):"]
    for example in examples:
        decimals = len(example["paper_text"].rstrip("%").partition(".")[2])
        ours = _percent(example["computed"], decimals, signed=example["paper_text"][0] in "+-")
        full = _percent(example["computed"])
        if full.lstrip("+") != ours.lstrip("+"):
            ours = f"{ours} ({full})"
        verdict = "agrees" if example["agrees"] else "DIFFERS"
        note = f": {example['note']}" if example["note"] and not example["agrees"] else ""
        lines.append(
            f"  {example['name']:<34} {example['formula']:<22} paper {example['paper_text']:>7}"
            f"  ours {ours:<18} {verdict}{note}"
        )
    return lines


def render_text(report: dict[str, Any]) -> str:
    sections = []
    if report["independent"] is not None:
        sections.append(_compound_lines(report))
    if report["modules_needed"] is not None:
        sections.append(_needed_lines(report["modules_needed"]))
    if report["paper_examples"] is not None:
        sections.append(_paper_lines(report["paper_examples"]))
    return "\n\n".join("\n".join(lines) for lines in sections)


def handle(args: argparse.Namespace) -> int:
    report = build_report(args)
    if args.json:
        print_json(report)
    else:
        print(render_text(report))
    return 0
