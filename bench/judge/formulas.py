"""The paper's compounding formulas (section 4) and the questions asked of them, as pure maths.

Conventions, shared by every function here:

- A Δ is a *fraction* (0.10 means 10%). Positive is a saving, negative a regression (eq 4.1).
- A **system-wide** Δ (eq 4.2, interactions) must be < 1: saving all of a system's resource
  is impossible. A **module-local** Δ (eq 4.3 and the hierarchical form) may be exactly 1,
  because a module can be switched off entirely (e.g. the vision encoder on text-only input).
- Anything wrong with the inputs raises `CompoundError` with a one-line message, so the CLI
  can print it and exit 2.

Return types: the scalar formulas return floats; `independent_saving` is the unchecked,
vectorised eq 4.2 that the verdict evaluates on bootstrap resamples (and the checked
`compound_independent` calls); `compound_modules` returns a `CompoundResult` that names its
declared and estimated inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from core.errors import CompoundError

WEIGHT_TOLERANCE = 1e-6
"""How far a set of weights or shares may sum from 1 (float round-off in measured shares)."""

InputSource = Literal["measured", "declared", "estimated"]
INPUT_SOURCES: tuple[str, ...] = ("measured", "declared", "estimated")

Reading = Literal["resource-saving", "speed-up", "growth"]
READINGS: dict[str, str] = {
    "resource-saving": "1 - (1-s)^n >= target: fraction of the resource saved (eq 4.2)",
    "speed-up": "(1-s)^-n - 1 >= target: throughput gain from the same savings",
    "growth": "(1+s)^n - 1 >= target: the paper's section-3 '+1% per module' reading",
}
"""The three readings of "efficiency gain" that `modules_needed` answers, with their inequality."""

_ROUND_OFF = 1e-9
"""Relative slack when a log ratio lands on an integer, so exact boundaries are not lost to
float round-off (e.g. 1 - 0.9**2 evaluates to 0.18999999999999995, not 0.19)."""


# --- validation -------------------------------------------------------------------------------


def _check_delta(delta: float, what: str, *, allow_full: bool) -> float:
    """Reject Δ values no real resource can have; `allow_full` admits a module switched off."""
    value = float(delta)
    if not math.isfinite(value):
        raise CompoundError(f"{what} must be a finite number, got {delta!r}")
    if value > 1 or (value == 1 and not allow_full):
        limit = "above 100%" if allow_full else "of 100% or more"
        raise CompoundError(f"{what} = {value:g} is impossible: a saving {limit} cannot happen")
    return value


def _check_deltas(deltas: Sequence[float], what: str, *, allow_full: bool) -> np.ndarray:
    return np.array(
        [_check_delta(d, f"{what}[{i}]", allow_full=allow_full) for i, d in enumerate(deltas)],
        dtype=float,
    )


def _check_weights(weights: Sequence[float], what: str) -> np.ndarray:
    """Weights must be non-negative and sum to 1: they are shares of one total."""
    array = np.array([float(w) for w in weights], dtype=float)
    if array.size == 0:
        raise CompoundError(f"no {what} given")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise CompoundError(f"{what} must be finite and non-negative, got {array.tolist()}")
    total = math.fsum(array)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise CompoundError(
            f"{what} must sum to 1 (within {WEIGHT_TOLERANCE:g}); they sum to {total:.6g}"
        )
    return array


def independent_saving(deltas: ArrayLike) -> np.ndarray:
    """Eq 4.2 over axis 0, unchecked: 1 − Π(1 − Δ_i), for arrays of bootstrap resamples too.

    Summed in log space (accurate for the tiny Δ the paper is about, via log1p/expm1) in sorted
    order, so the result does not depend on the order of the inputs; a Δ of 1 (a module
    switched off) gives exactly 1.
    """
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf is the switched-off module
        logs = np.sort(np.log1p(-np.asarray(deltas, dtype=float)), axis=0)
    return -np.expm1(np.sum(logs, axis=0)) + 0.0


# --- the formulas -----------------------------------------------------------------------------


def compound_independent(deltas: Sequence[float]) -> float:
    """Eq 4.2: Δ_total = 1 − Π(1 − Δ_i) for system-wide, non-interacting savings."""
    return float(independent_saving(_check_deltas(deltas, "delta", allow_full=False)))


def compound_weighted(deltas: Sequence[float], weights: Sequence[float]) -> float:
    """Eq 4.3: Δ_total = Σ w_i·Δ_i, where w_i is module i's share of the total resource."""
    if len(deltas) != len(weights):
        raise CompoundError(f"got {len(weights)} weights for {len(deltas)} deltas; need one each")
    values = _check_deltas(deltas, "delta", allow_full=True)
    shares = _check_weights(weights, "weights")
    return math.fsum(shares * values)


def compound_hierarchical(
    shares: Mapping[str, float], local: Mapping[str, Sequence[float]]
) -> float:
    """Amdahl form: Δ_total = 1 − Σ_m w_m·Π_t(1 − Δ_t,m), transforms t acting inside module m.

    Computed as Σ_m w_m·(1 − Π_t(1 − Δ_t,m)), which equals the formula when the shares sum
    to 1 and credits no saving to the (≤ 1e-6) slack a measured set of shares may have.
    Modules absent from `local` keep their full cost.
    """
    unknown = sorted(set(local) - set(shares))
    if unknown:
        raise CompoundError(f"local savings given for modules with no share: {', '.join(unknown)}")
    names = list(shares)
    weights = _check_weights([shares[name] for name in names], "module shares")
    per_module = [
        float(
            independent_saving(
                _check_deltas(local.get(name, ()), f"local delta of {name}", allow_full=True)
            )
        )
        for name in names
    ]
    return math.fsum(weights * np.array(per_module, dtype=float))


def compound_growth(gains: Sequence[float]) -> float:
    """Section-3 table: Π(1 + g_i) − 1, gains compounding multiplicatively (+1% → ×1.01)."""
    values = np.array([float(g) for g in gains], dtype=float)
    if not np.all(np.isfinite(values)) or np.any(values <= -1):
        raise CompoundError(f"growth rates must be finite and > -100%, got {values.tolist()}")
    return math.expm1(math.fsum(np.log1p(values)))


# --- measured and declared modules ------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSaving:
    """One module's saving, saying where the number came from.

    `declared` figures (e.g. the paper's unmeasured hardware rows) and `estimated` ones may be
    compounded with measured ones, but every result names them so they never pass as measured.
    """

    name: str
    delta: float
    weight: float | None = None
    source: InputSource = "measured"

    def __post_init__(self) -> None:
        if self.source not in INPUT_SOURCES:
            raise CompoundError(f"unknown source {self.source!r}; expected one of {INPUT_SOURCES}")
        _check_delta(self.delta, f"delta of {self.name}", allow_full=True)
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight >= 0):
            raise CompoundError(f"weight of {self.name} must be finite and >= 0")


@dataclass(frozen=True)
class CompoundResult:
    """Eq 4.2 (and eq 4.3 when every input has a weight) over a list of `ModuleSaving`."""

    independent: float
    weighted: float | None
    inputs: tuple[ModuleSaving, ...]
    declared_inputs: tuple[str, ...] = ()
    estimated_inputs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compound_modules(modules: Sequence[ModuleSaving]) -> CompoundResult:
    """Compound measured, declared and estimated savings, carrying their sources through."""
    if not modules:
        raise CompoundError("no module savings given")
    names = [m.name for m in modules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CompoundError(f"module names must be unique; repeated: {', '.join(duplicates)}")
    deltas = [_check_delta(m.delta, f"delta of {m.name}", allow_full=False) for m in modules]
    weights = [m.weight for m in modules]
    missing = [m.name for m in modules if m.weight is None]
    if missing and len(missing) < len(modules):
        raise CompoundError(
            f"give a weight for every module or none; missing: {', '.join(missing)}"
        )
    weighted = None if missing else compound_weighted(deltas, [float(w) for w in weights])
    return CompoundResult(
        independent=compound_independent(deltas),
        weighted=weighted,
        inputs=tuple(modules),
        declared_inputs=tuple(m.name for m in modules if m.source == "declared"),
        estimated_inputs=tuple(m.name for m in modules if m.source == "estimated"),
    )


# --- how many modules does a target take ------------------------------------------------------


def modules_needed(per_module_saving: float, target: float, reading: Reading) -> int | None:
    """Smallest n of equal independent modules with saving s whose compound reaches `target`.

    Returns None when no n can reach it (s <= 0, or a resource saving of 100% or more).
    """
    if reading not in READINGS:
        raise CompoundError(f"unknown reading {reading!r}; expected one of {tuple(READINGS)}")
    s, t = float(per_module_saving), float(target)
    if not (math.isfinite(s) and math.isfinite(t)):
        raise CompoundError("per-module saving and target must be finite numbers")
    if t <= 0:
        raise CompoundError(f"target must be > 0, got {t:g}")
    if reading != "growth" and s >= 1:
        raise CompoundError(f"per-module saving must be < 100% for the {reading} reading")
    if s <= 0 or (reading == "resource-saving" and t >= 1):
        return None
    if reading == "resource-saving":
        exact = math.log1p(-t) / math.log1p(-s)
    elif reading == "speed-up":
        exact = math.log1p(t) / -math.log1p(-s)
    else:
        exact = math.log1p(t) / math.log1p(s)
    return max(1, math.ceil(exact - _ROUND_OFF * max(1.0, exact)))


# --- the paper's worked examples --------------------------------------------------------------


@dataclass(frozen=True)
class PaperExample:
    """One number the paper prints, recomputed; `agrees` is judged at the paper's precision."""

    name: str
    formula: str
    inputs: dict[str, tuple[float, ...]]
    paper_text: str
    paper_printed: float
    computed: float
    agrees: bool
    note: str = ""


def _printed_fraction(text: str) -> tuple[float, int]:
    """'+9.27%' → (0.0927, 2): the value and how many decimals of a percent were printed."""
    number = text.strip().rstrip("%").replace("−", "-")
    decimals = len(number.split(".")[1]) if "." in number else 0
    return float(number) / 100, decimals


def _example(
    name: str,
    formula: str,
    inputs: dict[str, tuple[float, ...]],
    paper_text: str,
    computed: float,
    note: str = "",
) -> PaperExample:
    printed, decimals = _printed_fraction(paper_text)
    agrees = abs(computed * 100 - printed * 100) <= 0.5 * 10.0**-decimals + 1e-9
    return PaperExample(name, formula, inputs, paper_text, printed, computed, agrees, note)


PAPER_EXAMPLES: list[PaperExample] = [
    _example(
        "eq 4.2: two modules",
        "1 - (1-0.10)(1-0.15)",
        {"deltas": (0.10, 0.15)},
        "23.5%",
        compound_independent([0.10, 0.15]),
    ),
    _example(
        "eq 4.3: weighted modules",
        "0.6*10% + 0.4*15%",
        {"deltas": (0.10, 0.15), "weights": (0.6, 0.4)},
        "12%",
        compound_weighted([0.10, 0.15], [0.6, 0.4]),
    ),
    _example(
        "sec 3: three +1% modules",
        "(1.01)^3 - 1",
        {"gains": (0.01,) * 3},
        "+3.03%",
        compound_growth([0.01] * 3),
    ),
    _example(
        "sec 3: nine +1% modules",
        "(1.01)^9 - 1",
        {"gains": (0.01,) * 9},
        "+9.27%",
        compound_growth([0.01] * 9),
        note="arithmetic slip in the paper: (1.01)^9 - 1 = +9.37%, not +9.27%",
    ),
    _example(
        "sec 3: three -1% (power) modules",
        "(1.01)^-3 - 1",
        {"gains": (0.01,) * 3},
        "-2.94%",
        1 / (1 + compound_growth([0.01] * 3)) - 1,
        note="the paper's -2.94% is (1.01)^-3 - 1; (0.99)^3 - 1 would be -2.97%",
    ),
]
"""The paper's worked numbers next to ours, so reports can show where the paper slips."""
