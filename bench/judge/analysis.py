"""From raw samples to tables: summaries, paired comparisons and the flags a reader must see.

Everything here reads only the store's tidy frame, so any report can be recomputed from
samples.jsonl alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bench.judge.replicated import Estimate, Rounds, locations, saving
from bench.judge.stats import summarize
from core.samples import MEMORY_PASS, PASS_KEY, batch_of, process_of

# Metrics recorded once per request; a block's value is their mean (the mixed workload is
# bimodal, image vs text, so a per-block median would jump between the two modes).
PER_REQUEST = (
    "latency_e2e_s",
    "latency_prefill_s",
    "latency_decode_per_token_s",
)
# The `modality` of one-off records taken before the timed rounds, in the summary, and of the
# isolated memory pass of a co-resident run.
COLD_MODALITY = "before timing"
MEMORY_MODALITY = "memory pass (isolated)"
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
    "tail",
)
# Metrics compared between configurations: lower is better for all of them.
COMPARED: dict[str, str] = {
    "latency_mean_s": "latency",
    "energy_j": "energy",
    "peak_rss_bytes": "peak memory (RSS)",
    "peak_allocated_bytes": "peak memory (GPU)",
    "cost_usd_per_1k": "cost",
}
MODALITIES = ("image", "text")  # per-request latency is also compared per modality
# Fixed per process: one value per process (its peak), never one per round.
PER_PROCESS = ("peak_rss_bytes", "peak_allocated_bytes")


@dataclass
class RunTables:
    """Everything a run's reports show, recomputed from its stored records."""

    summary: pd.DataFrame
    shares: pd.DataFrame
    comparisons: pd.DataFrame
    flags: list[str]
    failures: pd.DataFrame
    verdict: dict[str, Any]
    busy: dict[str, Any] = field(default_factory=dict)  # `judge.busy.busy_summary`
    batches: pd.DataFrame = field(default_factory=pd.DataFrame)  # `batch_table`


# Per configuration and batch size in batches.csv: the median over rounds of each.
BATCH_METRICS: dict[str, str] = {
    "latency_e2e_s": "latency per request (s)",
    "latency_prefill_s": "time to first token (s)",
    "latency_decode_per_token_s": "decode per token (s)",
    "throughput_rps": "requests/s",
    "throughput_tps": "tokens/s",
    "energy_per_token_j": "energy per token (J)",
    "energy_above_idle_per_token_j": "energy above idle per token (J)",
}


def at_batch(samples: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """The samples served at `batch_size`, plus those that belong to no one batch size (cold
    starts, applied figures), so every table and verdict reads one serving point."""
    keep = np.array([batch_of(e) in (None, batch_size) for e in samples["extra"]], dtype=bool)
    return samples.loc[keep]


def primary_samples(meta: dict[str, Any], samples: pd.DataFrame) -> pd.DataFrame:
    """A stored run's samples at its primary (first) batch size, as its verdict reads them."""
    serving = (meta.get("config") or {}).get("serving") or {}
    return at_batch(samples, int((serving.get("batch_sizes") or [1])[0]))


def batch_table(samples: pd.DataFrame, sizes: list[int]) -> pd.DataFrame:
    """Per configuration and batch size: medians over rounds of the serving figures, and the
    throughput relative to the same configuration at the first batch size."""
    records = []
    for size in sizes:
        served = at_batch(samples, size)
        for metric, label in BATCH_METRICS.items():
            values = block_values(served, metric)
            for config in values.columns:
                column = values[config].dropna()
                if column.empty:
                    continue
                records.append(
                    {
                        "config": config,
                        "batch_size": size,
                        "metric": metric,
                        "label": label,
                        "median": float(column.median()),
                        "rounds": int(len(column)),
                    }
                )
    table = pd.DataFrame.from_records(
        records, columns=["config", "batch_size", "metric", "label", "median", "rounds"]
    )
    if table.empty:
        return table
    throughput = table[table.metric == "throughput_rps"].set_index(["config", "batch_size"])
    first = throughput.xs(sizes[0], level="batch_size")["median"]
    table["throughput_x"] = [
        throughput.loc[(row.config, row.batch_size), "median"] / first[row.config]
        if row.metric == "throughput_rps" and row.config in first.index
        else np.nan
        for row in table.itertuples()
    ]
    return table


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
                tail=bool(abs(s.mean - s.median) > s.iqr),
            )
        records.append(record)
    # One-off records taken before the timed rounds (one per process): the cold first call,
    # the worker's start-up, and what transforms report once (bytes a sleeping encoder frees).
    cold = samples[samples["block"] < 0]
    isolated = cold.index.isin(memory_pass(cold).index)
    cold = cold.assign(modality=np.where(isolated, MEMORY_MODALITY, COLD_MODALITY))
    for (config, metric, module, source, unit, modality), group in cold.groupby(
        ["config", "metric", "module", "source", "unit", "modality"], sort=True
    ):
        values = group["value"].to_numpy(dtype=float)
        records.append(
            {
                "config": config,
                "metric": metric,
                "module": module,
                "modality": modality,
                "source": source,
                "unit": unit,
                "n": len(values),
                "n_missing": int(np.isnan(values).sum()),
                "median": float(np.nanmedian(values)) if np.isfinite(values).any() else np.nan,
                "mean": float(np.nanmean(values)) if np.isfinite(values).any() else np.nan,
            }
        )
    return pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS))


def rounds_of(samples: pd.DataFrame, metric: str, module: str = "total") -> Rounds:
    """Per-round values of `metric` with the epoch (process) of every round."""
    table = block_values(samples, metric, module)
    return Rounds(table, epochs_of(samples).reindex(table.index).fillna(0).astype(int))


def epochs_of(samples: pd.DataFrame) -> pd.Series:
    """round → the epoch (process) it was measured in (all configurations share it)."""
    blocks = timed(samples)
    epochs = pd.Series([process_of(e) for e in blocks["extra"]], index=blocks["block"].to_numpy())
    return epochs.groupby(level=0).max()


def memory_pass(samples: pd.DataFrame) -> pd.DataFrame:
    """The samples of a co-resident run's isolated memory pass (`runner.memory_pass`)."""
    marked = [isinstance(e, dict) and e.get(PASS_KEY) == MEMORY_PASS for e in samples["extra"]]
    return samples.loc[np.array(marked, dtype=bool)]


def process_table(samples: pd.DataFrame, metric: str) -> Rounds:
    """One value per process (its peak): rows are epochs, each its own resampled unit. A
    co-resident run's processes held every configuration at once, so its per-configuration
    peaks come from its isolated memory pass."""
    isolated = memory_pass(samples)
    rows = isolated if len(isolated) else timed(samples)
    rows = rows[(rows["metric"] == metric) & (rows["module"] == "total")]
    if rows.empty:
        return Rounds(pd.DataFrame(), pd.Series(dtype=int))
    frame = rows.assign(epoch=[process_of(e) for e in rows["extra"]])
    table = frame.pivot_table(index="epoch", columns="config", values="value", aggfunc="max")
    return Rounds(table, pd.Series(table.index, index=table.index))


def paired_saving(rounds: Rounds, base: str, opt: str) -> Estimate | None:
    """Δ of `opt` against `base` over the rows both have (per-process locations, from
    `replicated.locations`, or rounds of a one-process run), its interval including the
    variance between processes; None when fewer than two such rows exist or a value is not
    positive.

    The one estimator of one configuration against another: comparisons.csv, the verdict,
    leave-one-out and the A/A control all come from it (`replicated.saving`).
    """
    if base not in rounds.table or opt not in rounds.table:
        return None
    pair = rounds.select([base, opt])
    if len(pair.table) < 2 or (pair.table <= 0).to_numpy().any():
        return None
    return saving(pair, base, opt)


def metric_rounds(samples: pd.DataFrame, metric: str) -> Rounds:
    """Per-round values, or per-process ones for a quantity fixed per process."""
    return process_table(samples, metric) if metric in PER_PROCESS else rounds_of(samples, metric)


def compared_values(samples: pd.DataFrame, metric: str) -> Rounds:
    """What a comparison of `metric` between configurations is made of: per-process peaks for
    a quantity fixed per process, else the per-process locations of its rounds."""
    rounds = metric_rounds(samples, metric)
    return rounds if metric in PER_PROCESS else locations(rounds)


def modality_rounds(samples: pd.DataFrame, modality: str) -> Rounds:
    """Per-round mean end-to-end latency of one modality's requests: a transform that serves
    only image (or only text) requests differently shows its saving there, undiluted."""
    marked = with_modality(timed(samples))
    requests = marked[(marked["metric"] == "latency_e2e_s") & (marked["modality"] == modality)]
    table = block_values(requests, "latency_e2e_s")
    return Rounds(table, epochs_of(samples).reindex(table.index).fillna(0).astype(int))


def _compared_rounds(samples: pd.DataFrame) -> list[tuple[str, str, Rounds]]:
    """(metric, label, per-round values) of everything compared: the COMPARED metrics, then
    the latency of image and of text requests apart."""
    compared = [(m, label, compared_values(samples, m)) for m, label in COMPARED.items()]
    for modality in MODALITIES:
        label = f"latency, {modality} requests"
        compared.append(("latency_e2e_s", label, locations(modality_rounds(samples, modality))))
    return compared


def comparisons(samples: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Δ = (base − opt)/base per configuration and compared metric, with its interval."""
    records = []
    for metric, label, rounds in _compared_rounds(samples):
        if rounds.table.empty or baseline not in rounds.table:
            continue
        sources = sorted(set(timed(samples).query("metric == @metric")["source"]))
        for config in rounds.table.columns:
            if config == baseline:
                continue
            estimate = paired_saving(rounds, baseline, config)
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
                    "rounds": estimate.rounds,
                    "processes": estimate.processes,
                    "interval": estimate.method,
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
    excluded = [e for e in missing["extra"] if isinstance(e, dict) and e.get("excluded")]
    if excluded:
        found.append(
            f"energy: {len(excluded)} window(s) excluded as too short to read "
            f"({excluded[0]['excluded']})"
        )
    if len(missing) > len(excluded):
        found.append(
            f"energy: {len(missing) - len(excluded)} window(s) read zero or failed "
            "(kept as missing)"
        )
    drifted = [e for e in energy["extra"] if isinstance(e, dict) and e.get("drifted")]
    if drifted:
        found.append(f"gpu drift: SM clock or temperature drifted in {len(drifted)} block(s)")
    found += tail_flags(summary)
    overhead = timed(samples)[timed(samples)["metric"] == "hook_overhead"]["value"]
    if len(overhead) and float(np.median(overhead)) > 0.02:
        found.append(
            f"hooks: median per-module hook overhead {float(np.median(overhead)):.1%} "
            "> 2% (shares still exclude nothing; end-to-end timings are hook-free)"
        )
    return found


def tail_flags(summary: pd.DataFrame) -> list[str]:
    """Where mean and median disagree by more than the IQR, the median hides a tail."""
    if "mean" not in summary:
        return []
    rows = summary[
        summary["metric"].isin(["latency_mean_s", "latency_e2e_s"])
        & (summary["module"] == "total")
        & (summary["modality"] != COLD_MODALITY)
    ]
    tailed = rows[rows["tail"].fillna(False).astype(bool)]
    return [
        f"tail: {row.config} {row.metric}"
        + ("" if row.modality == "all" else f" {row.modality} requests")
        + f": mean {row.mean:.4g} vs median {row.median:.4g} (IQR {row.iqr:.3g}, p90 {row.p90:.4g})"
        for row in tailed.itertuples()
    ]
