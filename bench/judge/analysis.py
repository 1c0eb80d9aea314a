"""From raw samples to tables: summaries, paired comparisons and the flags a reader must see.

Everything here reads only the store's tidy frame, so any report can be recomputed from
samples.jsonl alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bench.judge.stats import DeltaEstimate, paired_delta, summarize

# Metrics recorded once per request; a block's value is their mean (the mixed workload is
# bimodal, image vs text, so a per-block median would jump between the two modes).
PER_REQUEST = (
    "latency_e2e_s",
    "latency_prefill_s",
    "latency_decode_per_token_s",
)
# The `modality` of one-off records taken before the timed rounds, in the summary.
COLD_MODALITY = "before timing"
SUMMARY_COLUMNS = (
    "config",
    "metric",
    "module",
    "modality",
    "source",
    "unit",
    "n",
    "n_missing",
    "median",
    "mean",
    "iqr",
    "p90",
    "p99",
    "rel_iqr",
    "noisy",
)
# Metrics compared between configurations: lower is better for all of them.
COMPARED: dict[str, str] = {
    "latency_mean_s": "latency",
    "energy_j": "energy",
    "peak_rss_bytes": "peak memory (RSS)",
    "peak_allocated_bytes": "peak memory (GPU)",
    "cost_usd_per_1k": "cost",
}


@dataclass
class RunTables:
    """Everything a run's reports show, recomputed from its stored records."""

    summary: pd.DataFrame
    shares: pd.DataFrame
    comparisons: pd.DataFrame
    flags: list[str]
    failures: pd.DataFrame
    verdict: dict[str, Any]


def timed(samples: pd.DataFrame) -> pd.DataFrame:
    """Samples of the timed rounds only (the cold-start records carry block -1)."""
    return samples[samples["block"] >= 0]


def block_values(samples: pd.DataFrame, metric: str, module: str = "total") -> pd.DataFrame:
    """One value per (round, configuration): rows are rounds, columns configurations."""
    rows = timed(samples)
    rows = rows[(rows["metric"] == metric) & (rows["module"] == module)]
    if rows.empty:
        return pd.DataFrame()
    return rows.pivot_table(index="block", columns="config", values="value", aggfunc="mean")


def with_modality(samples: pd.DataFrame) -> pd.DataFrame:
    """Add a `modality` column: image/text for per-request samples, "all" for block figures."""
    out = samples.copy()
    out["modality"] = [
        extra.get("modality", "all") if isinstance(extra, dict) and metric in PER_REQUEST else "all"
        for extra, metric in zip(out["extra"], out["metric"], strict=True)
    ]
    return out


def summary_table(samples: pd.DataFrame) -> pd.DataFrame:
    """Median, IQR, p90, p99 per configuration, metric, module, modality and source.

    Per-request latencies are summarised per modality: the mixed workload is bimodal (image
    requests are several times slower), so one pooled IQR would only measure the mix.
    """
    records = []
    for (config, metric, module, modality, source, unit), group in with_modality(
        timed(samples)
    ).groupby(["config", "metric", "module", "modality", "source", "unit"], sort=True):
        values = group["value"].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        record = {
            "config": config,
            "metric": metric,
            "module": module,
            "modality": modality,
            "source": source,
            "unit": unit,
            "n": len(values),
            "n_missing": int(len(values) - len(finite)),
        }
        if len(finite):
            s = summarize(finite)
            record.update(
                median=s.median,
                mean=s.mean,
                iqr=s.iqr,
                p90=s.p90,
                p99=s.p99,
                rel_iqr=s.rel_iqr,
                noisy=s.noisy,
            )
        records.append(record)
    # One-off records taken before the timed rounds: the cold first call, and what transforms
    # report once (bytes a sleeping encoder frees).
    cold = samples[samples["block"] < 0]
    for row in cold.itertuples():
        records.append(
            {
                "config": row.config,
                "metric": row.metric,
                "module": row.module,
                "modality": COLD_MODALITY,
                "source": row.source,
                "unit": row.unit,
                "n": 1,
                "n_missing": 0,
                "median": row.value,
                "mean": row.value,
            }
        )
    return pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS))


def paired_saving(table: pd.DataFrame, base: str, opt: str, seed: int = 0) -> DeltaEstimate | None:
    """Δ of `opt` against `base` (columns of a `block_values` table) over the rounds both have;
    None when fewer than two such rounds exist or a value is not positive.

    The one estimator of one configuration against another: comparisons.csv, the verdict's
    measured stack, leave-one-out and the A/A control all come from it (`stats.paired_delta`).
    """
    if base not in table or opt not in table:
        return None
    pair = table[[base, opt]].dropna()
    if len(pair) < 2 or (pair <= 0).to_numpy().any():
        return None
    return paired_delta(pair[base].to_numpy(), pair[opt].to_numpy(), seed=seed)


def comparisons(samples: pd.DataFrame, baseline: str, seed: int = 0) -> pd.DataFrame:
    """Δ = (base − opt)/base per configuration and compared metric, with a paired bootstrap CI."""
    records = []
    for metric, label in COMPARED.items():
        table = block_values(samples, metric)
        if table.empty or baseline not in table:
            continue
        sources = sorted(set(timed(samples).query("metric == @metric")["source"]))
        for config in table.columns:
            if config == baseline:
                continue
            estimate = paired_saving(table, baseline, config, seed)
            if estimate is None:
                continue
            records.append(
                {
                    "config": config,
                    "metric": metric,
                    "label": label,
                    "delta": estimate.point,
                    "lo": estimate.lo,
                    "hi": estimate.hi,
                    "rounds": estimate.n_pairs,
                    "source": "/".join(sources),
                }
            )
    return pd.DataFrame.from_records(records)


def flags(samples: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """Warnings a reader must see: noisy metrics, zero energy windows, GPU drift, hook overhead."""
    found = []
    if "noisy" in summary:
        judged = summary[
            summary["metric"].isin([*COMPARED, "latency_e2e_s"]) & (summary["module"] == "total")
        ]
        for row in judged[judged["noisy"].fillna(False).astype(bool)].itertuples():
            which = "" if row.modality == "all" else f" {row.modality} requests"
            found.append(
                f"noisy: {row.config} {row.metric}{which}: IQR/median {row.rel_iqr:.0%} > 10%"
            )
    energy = timed(samples)[timed(samples)["metric"] == "energy_j"]
    missing = energy[~np.isfinite(energy["value"].astype(float))]
    if len(missing):
        found.append(f"energy: {len(missing)} window(s) read zero or failed (kept as missing)")
    drifted = [e for e in energy["extra"] if isinstance(e, dict) and e.get("drifted")]
    if drifted:
        found.append(f"gpu drift: SM clock or temperature drifted in {len(drifted)} block(s)")
    overhead = timed(samples)[timed(samples)["metric"] == "hook_overhead"]["value"]
    if len(overhead) and float(np.median(overhead)) > 0.02:
        found.append(
            f"hooks: median per-module hook overhead {float(np.median(overhead)):.1%} "
            "> 2% (shares still exclude nothing; end-to-end timings are hook-free)"
        )
    return found
