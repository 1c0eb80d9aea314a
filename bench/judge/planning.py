"""How many processes and rounds a resolution needs: Kalibera and Jones (ISMM 2013), with the
t quantiles a small number of processes brings.

A contrast of per-process locations whose squared coefficients sum to w has, with P
processes of K rounds each, SE² = w·(τ² + σ_eff²/K)/P (`components.Components`). Its 95%
half-width is t(P−1)·SE; the smallest change detected with 80% power (the MDE) is
(t₀.₉₇₅ + t₀.₈)·SE. Each process costs its start-up, each round one block of every
configuration; the plan is the (P, K) that reaches the target in the least time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats

from bench.judge.components import Components
from bench.judge.sequential import look_confidence

CONFIDENCE = 0.95
POWER = 0.8
MIN_PROCESSES = 3  # fewer leaves the process level with one or no degree of freedom
MAX_ROUNDS = 100_000


def contrast_weight(singles: int) -> int:
    """Σ of squared coefficients of the log-scale interaction contrast
    stack − Σ singles + (k − 1)·baseline: 1 + k + (k − 1)²; a plain A vs B comparison is 2."""
    return 1 + singles + (singles - 1) ** 2


def factor(processes: int, detect: bool) -> float:
    """Half-width (detect=False) or MDE (detect=True) in units of the SE, t with P−1 df."""
    df = processes - 1
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))
    return half + float(stats.t.ppf(POWER, df)) if detect else half


def resolution(se: float, processes: int, detect: bool = True) -> float:
    """The MDE (or half-width) as a saving, from a log-scale SE."""
    if processes < 2 or not math.isfinite(se):
        return math.nan
    return float(math.expm1(factor(processes, detect) * se))


@dataclass(frozen=True)
class Plan:
    """Processes and rounds that reach `target` (a fraction), and how long they take."""

    target: float
    detect: bool  # True: `target` is an MDE; False: a 95% half-width
    weight: float
    processes: int | None
    rounds_per_process: int | None
    seconds: float | None
    expected: float | None  # the resolution the plan is expected to reach

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_for(
    target: float,
    components: Components,
    weight: float,
    process_seconds: float,
    round_seconds: float,
    *,
    detect: bool = True,
    max_processes: int = 200,
) -> Plan:
    """The fastest (P, K) whose contrast reaches `target`; processes None when none does.

    `process_seconds` is one process's start-up for all the configurations it serves,
    `round_seconds` one round of all of them."""
    best: tuple[float, int, int] | None = None
    log_target = math.log1p(target)
    for p in range(MIN_PROCESSES, max_processes + 1):
        allowed = p * (log_target / factor(p, detect)) ** 2 / weight  # τ² + σ²/K at most
        spare = allowed - components.tau**2
        if spare <= 0:
            continue
        k = max(2, math.ceil(components.sigma_effective**2 / spare))
        if k > MAX_ROUNDS:
            continue
        seconds = p * (process_seconds + k * round_seconds)
        if best is None or seconds < best[0]:
            best = (seconds, p, k)
    if best is None:
        return Plan(target, detect, weight, None, None, None, None)
    seconds, p, k = best
    se = components.contrast_se(weight, p, k)
    return Plan(target, detect, weight, p, k, seconds, resolution(se, p, detect))


def run_plan(
    calibration: dict[str, Any],
    configurations: int,
    singles: int,
    target: float,
    *,
    sequential: bool,
    memory_processes: int,
) -> dict[str, Any]:
    """Processes and rounds for a run of `configurations` whose residual's 95% half-width
    should be `target` (a fraction), from a stored calibration's components and costs
    (per configuration: one start-up, one block). A sequential run's last interval is wider
    (`sequential.look_confidence`): the plan is redone until it allows for that."""
    components = Components(**calibration["components"])
    weight = contrast_weight(max(singles, 2))
    process_s = float(calibration["worker_start_s"]) * configurations
    round_s = float(calibration["block_s"]) * configurations
    goal = target
    for _ in range(4):
        plan = plan_for(goal, components, weight, process_s, round_s, detect=False)
        if plan.processes is None or not sequential:
            break
        confidence = look_confidence(plan.processes, plan.processes, final=True)
        widened = float(stats.t.ppf(0.5 + confidence / 2, plan.processes - 1))
        expected = math.expm1(
            widened * components.contrast_se(weight, plan.processes, plan.rounds_per_process)
        )
        if expected <= target:
            plan = Plan(
                target,
                False,
                weight,
                plan.processes,
                plan.rounds_per_process,
                plan.seconds,
                expected,
            )
            break
        goal *= target / expected
    memory_s = (
        memory_processes
        * configurations
        * (float(calibration["worker_start_s"]) + float(calibration["block_s"]))
    )
    return {
        **plan.to_dict(),
        "target": target,
        "memory_pass_s": memory_s,
        "how": "estimated: τ and σ_eff from the stored calibration "
        f"({calibration.get('machine', '?')}), start-up and block seconds per configuration "
        f"from it, times {configurations} configurations; checks and scoring come on top",
    }
