"""Module shares w_m: the one estimator every table and prediction uses.

A module's share is its mean seconds per hooked pass over the mean hooked-pass total (a ratio
of means), with "other" the rest: embeddings, norms, sampling and Python that no handle
covers. A ratio of means weighs each pass by its length, as the time it describes does; the
hierarchical prediction takes both the shares and each module's mean seconds from here.
"""

from __future__ import annotations

import pandas as pd

from bench.judge.analysis import timed

OTHER = "other"
SHARE_COLUMNS = ("config", "module", "seconds", "share", "rounds")


def module_seconds(samples: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per hooked pass of each module and of "other"; rows are configurations."""
    rows = timed(samples)
    modules = rows[rows["metric"] == "module_time_s"]
    totals = rows[rows["metric"] == "hooked_block_seconds"]
    if modules.empty or totals.empty:
        return pd.DataFrame()
    per_block = modules.pivot_table(index=["config", "block"], columns="module", values="value")
    total = totals.set_index(["config", "block"])["value"]
    per_block[OTHER] = total.reindex(per_block.index) - per_block.sum(axis=1)
    means = per_block.groupby(level="config").mean()
    means.columns.name = None
    return means


def shares_of(seconds: pd.DataFrame) -> pd.DataFrame:
    """Each module's share w_m of its configuration's total, from `module_seconds`."""
    return seconds.div(seconds.sum(axis=1), axis=0)


def module_shares(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration and module: mean seconds, share of the total, hooked passes."""
    seconds = module_seconds(samples)
    if seconds.empty:
        return pd.DataFrame(columns=list(SHARE_COLUMNS))
    rounds = timed(samples).query("metric == 'hooked_block_seconds'").groupby("config").size()
    shares = shares_of(seconds)
    long = seconds.stack().rename("seconds").to_frame().join(shares.stack().rename("share"))
    long = long.rename_axis(["config", "module"]).reset_index()
    long["rounds"] = long["config"].map(rounds).astype(int)
    return long[list(SHARE_COLUMNS)]
