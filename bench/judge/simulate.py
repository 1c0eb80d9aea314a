"""Does the judge keep its promises at this machine's noise? Simulated runs from measured
components, judged by the very code that judges real runs.

Each simulated run draws log block times

    log y[c, e, r] = log(1 − Δ_c) + ρ[e, r] + τ[c, e] + ε[c, e, r]

with ρ and τ normal at the measured SDs and ε resampled from the run's own block noise (its
real tails), for a baseline, an A/A copy, three singles with known savings and their stack
at exactly the eq 4.2 product (true residual 0). It reports how often the 95% intervals
cover the truth (singles, residual), how often the A/A control departs from 0, and, for the
sequential rule (`bench.judge.sequential`), how often a run that stops when decided decides
wrongly: sub-/super-multiplicative when the truth is 0, and `compounds` when the truth lies
exactly at the margin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from bench.judge.components import Components
from bench.judge.replicated import Rounds, locations
from bench.judge.sequential import look_confidence, look_points
from bench.judge.verdict import departure, metric_verdict, residual_estimate

BASE, COPY = "baseline", "copy"
SINGLES = {"a": 0.01, "b": 0.02, "c": 0.05}  # the planted savings of the three singles
STACK = "a+b+c"
FEWEST_PROCESSES = 4


@dataclass(frozen=True)
class ErrorRates:
    runs: int
    processes: int
    rounds_per_process: int
    singles_covered: float
    residual_covered: float
    aa_departures: float
    sequential_wrong_at_zero: float  # decided sub/super when the residual is 0
    sequential_wrong_at_margin: float  # decided `compounds` when it is exactly the margin
    sequential_stopped_early: float  # share of runs (truth 0) that stopped before the last look
    looks: list[int]
    margin: float
    noise: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"simulated {self.runs} runs of {self.processes} processes × "
            f"{self.rounds_per_process} rounds ({self.noise}): 95% intervals covered the "
            f"singles {self.singles_covered:.1%} and the residual {self.residual_covered:.1%}; "
            f"A/A departed from 0 in {self.aa_departures:.1%}; stopping when decided was wrong "
            f"in {self.sequential_wrong_at_zero:.1%} (truth 0) and "
            f"{self.sequential_wrong_at_margin:.1%} (truth at the ±{self.margin:.0%} margin)"
        )


def simulated_rounds(
    rng: np.random.Generator,
    savings: dict[str, float],
    processes: int,
    rounds: int,
    components: Components,
    noise: np.ndarray | None,
) -> Rounds:
    """One simulated run's per-round values; `noise` None draws ε normal at σ."""
    shape = (processes, rounds)
    shared = components.round_sd * rng.standard_normal(shape)
    table = {}
    for name, saving in savings.items():
        offset = components.tau * rng.standard_normal(processes)[:, None]
        if noise is None:
            block = components.sigma * rng.standard_normal(shape)
        else:
            block = rng.choice(noise, size=shape)
        table[name] = np.exp(np.log1p(-saving) + shared + offset + block).ravel()
    frame = pd.DataFrame(table)
    return Rounds(frame, pd.Series(np.repeat(np.arange(processes), rounds), index=frame.index))


def _savings(stack_residual: float) -> dict[str, float]:
    product = float(np.prod([1 - s for s in SINGLES.values()]))
    return {BASE: 0.0, COPY: 0.0, **SINGLES, STACK: 1 - product + stack_residual}


def error_rates(
    components: Components,
    noise: np.ndarray | None,
    processes: int,
    rounds: int,
    *,
    runs: int = 1000,
    margin: float = 0.02,
    seed: int = 0,
) -> ErrorRates:
    """Coverage and error rates of the judge over `runs` simulated runs."""
    if processes < FEWEST_PROCESSES or rounds < 2:
        raise ValueError(f"simulation needs at least {FEWEST_PROCESSES} processes of 2 rounds")
    rng = np.random.default_rng(seed)
    singles = list(SINGLES)
    covered = residual_covered = aa_departed = wrong_zero = wrong_margin = early = 0
    for _ in range(runs):
        run = simulated_rounds(rng, _savings(0.0), processes, rounds, components, noise)
        located = locations(run)
        row = metric_verdict("latency_mean_s", "s", located, BASE, singles, STACK, margin=margin)
        covered += sum(row.singles[n].lo <= SINGLES[n] <= row.singles[n].hi for n in singles)
        residual_covered += row.residual.lo <= 0 <= row.residual.hi
        aa = metric_verdict("latency_mean_s", "s", located, BASE, [COPY], singles[0], margin=margin)
        aa_departed += not (aa.singles[COPY].lo <= 0 <= aa.singles[COPY].hi)
        outcome, looks = _sequential(located, processes, margin)
        wrong_zero += outcome in ("below", "above")
        early += looks < processes
        at_margin = locations(
            simulated_rounds(rng, _savings(margin), processes, rounds, components, noise)
        )
        wrong_margin += _sequential(at_margin, processes, margin)[0] == "within"
    return ErrorRates(
        runs=runs,
        processes=processes,
        rounds_per_process=rounds,
        singles_covered=covered / (runs * len(singles)),
        residual_covered=residual_covered / runs,
        aa_departures=aa_departed / runs,
        sequential_wrong_at_zero=wrong_zero / runs,
        sequential_wrong_at_margin=wrong_margin / runs,
        sequential_stopped_early=early / runs,
        looks=list(look_points(processes)),
        margin=margin,
        noise="block noise resampled from the run" if noise is not None else "normal noise",
    )


def _sequential(located: Rounds, processes: int, margin: float) -> tuple[str, int]:
    """The rule on one simulated run: look at `sequential.look_points`, stop at the first
    decisive interval. Returns its outcome and the processes it used."""
    names = [BASE, *SINGLES, STACK]
    joint = located.select(names)
    outcome = "inconclusive"
    for k in look_points(processes):
        rows = (joint.epochs < k).to_numpy()
        part = Rounds(joint.table[rows], joint.epochs[rows], joint.round_count)
        confidence = look_confidence(k, processes, final=k == processes)
        residual = residual_estimate(part, BASE, list(SINGLES), STACK, confidence)
        outcome = departure(residual, margin).outcome
        if outcome != "inconclusive":
            return outcome, k
    return outcome, processes
