"""Two stored runs side by side: per configuration and metric, the change from A to B with an
interval, and the differences between their environments that make the change suspect.

Within a run the verdict pairs configurations round by round (`bench.judge.replicated`). Two
runs share no rounds, so the unit here is the worker process: each process gives the 20%-trimmed
mean log value of its rounds (a few stalled blocks do not move it; MEASUREMENT.md's heavy right
tail), and Δ = 1 − exp(mean_B − mean_A) over the two runs' processes, with a Welch t interval on
the difference of those means. Process-to-process variance is inside it, as
in the verdict. A run measured in one process falls back to its rounds as units, and the row
says so: that interval is too narrow (MEASUREMENT.md: identical processes differ by 1-4%).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from bench.configuration import ServingSpec, WorkloadSpec
from bench.judge.analysis import COMPARED, metric_rounds
from bench.judge.replicated import trimmed_mean

CONFIDENCE = 0.95
# (label, path into run.json): what must match for two runs to be compared without a warning.
ENVIRONMENT_KEYS = (
    ("device", ("environment", "device")),
    ("CPU", ("environment", "cpu", "model")),
    ("GPU", ("environment", "gpu", "name")),
    ("threads", ("config", "protocol", "threads")),
    ("torch", ("environment", "versions", "torch")),
    ("transformers", ("environment", "versions", "transformers")),
    ("python", ("environment", "versions", "python")),
    ("commit", ("environment", "git", "commit")),
    ("uncommitted changes", ("environment", "git", "dirty")),
    ("preset", ("config", "source", "preset")),
    ("model directory", ("config", "source", "model_path")),
    ("dtype", ("config", "source", "dtype")),
    ("engine", ("config", "serving", "engine")),
    ("batch sizes", ("config", "serving", "batch_sizes")),
    ("workload", ("config", "workload")),
)


@dataclass(frozen=True)
class Change:
    """One configuration's metric from run A to run B; Δ > 0: B is lower (saves)."""

    config: str
    metric: str
    label: str
    a: float  # exp of the mean over A's processes of their trimmed mean log values
    b: float
    delta: float
    lo: float
    hi: float
    processes_a: int
    processes_b: int
    units: str  # "processes", or "rounds" when a run had one process

    @property
    def word(self) -> str:
        if self.lo > 0:
            return "lower"
        if self.hi < 0:
            return "higher"
        return "unresolved"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "word": self.word}


def _lookup(meta: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = meta
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _with_defaults(meta: dict[str, Any]) -> dict[str, Any]:
    """run.json with the workload and serving settings older runs did not store filled in
    with the defaults they ran under, so only real differences are reported."""
    config = dict(meta.get("config") or {})
    for key, default in (("workload", WorkloadSpec()), ("serving", ServingSpec())):
        stored = config.get(key) if isinstance(config.get(key), dict) else {}
        config[key] = {**_json_ready(asdict(default)), **stored}
    return {**meta, "config": config}


def _json_ready(values: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists, as run.json holds them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def environment_differences(meta_a: dict[str, Any], meta_b: dict[str, Any]) -> list[str]:
    """One line per setting the two runs do not share, like pytest-benchmark's machine-info
    warning: a change measured across them may be the setting's, not the code's."""
    lines = []
    meta_a, meta_b = _with_defaults(meta_a), _with_defaults(meta_b)
    for label, path in ENVIRONMENT_KEYS:
        a, b = _lookup(meta_a, path), _lookup(meta_b, path)
        if a != b:
            lines.append(f"{label}: {_short(a)} (A) vs {_short(b)} (B)")
    return lines


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 40 and all(c in "0123456789abcdef" for c in text) else text


def _process_means(samples: pd.DataFrame, metric: str, config: str) -> tuple[np.ndarray, str]:
    """Trimmed mean log value per process (or each round's log value when there is one
    process)."""
    rounds = metric_rounds(samples, metric)
    if config not in rounds.table:
        return np.array([]), "processes"
    values = rounds.table[config].dropna()
    values = values[values > 0]
    logs = np.log(values.to_numpy(dtype=float))
    epochs = rounds.epochs.reindex(values.index).to_numpy()
    labels = np.unique(epochs)
    if labels.size < 2:
        return logs, "rounds"
    return np.array([trimmed_mean(logs[epochs == label]) for label in labels]), "processes"


def change(
    samples_a: pd.DataFrame, samples_b: pd.DataFrame, config: str, metric: str
) -> Change | None:
    """Δ of `config`'s `metric` from A to B, or None when either run lacks two values."""
    a, units_a = _process_means(samples_a, metric, config)
    b, units_b = _process_means(samples_b, metric, config)
    if len(a) < 2 or len(b) < 2:
        return None
    difference = float(b.mean() - a.mean())
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(var_a + var_b)
    if se > 0:
        df = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * se
    else:
        half = 0.0
    units = "processes" if units_a == units_b == "processes" else "rounds"
    return Change(
        config=config,
        metric=metric,
        label=COMPARED.get(metric, metric),
        a=float(math.exp(a.mean())),
        b=float(math.exp(b.mean())),
        delta=-math.expm1(difference) + 0.0,
        lo=-math.expm1(difference + half) + 0.0,
        hi=-math.expm1(difference - half) + 0.0,
        processes_a=len(a) if units_a == "processes" else 1,
        processes_b=len(b) if units_b == "processes" else 1,
        units=units,
    )


def changes(
    samples_a: pd.DataFrame, samples_b: pd.DataFrame, metrics: tuple[str, ...]
) -> list[Change]:
    """Every configuration both runs measured, for each metric."""
    shared = sorted(set(samples_a["config"]) & set(samples_b["config"]))
    found = []
    for metric in metrics:
        for config in shared:
            result = change(samples_a, samples_b, config, metric)
            if result is not None:
                found.append(result)
    return found


def gate_crossed(found: list[Change], slower_pct: float, metric: str) -> list[Change]:
    """The changes of `metric` that make B slower than A by more than `slower_pct` percent
    with an interval that excludes no change: a CI gate does not fail on noise."""
    limit = -slower_pct / 100
    return [c for c in found if c.metric == metric and c.delta < limit and c.hi < 0]
