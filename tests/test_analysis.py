"""Analysis on synthetic stored samples with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.judge import analysis
from bench.judge.shares import module_shares
from core.samples import Sample


def _frame(samples: list[Sample]) -> pd.DataFrame:
    return pd.DataFrame([s.to_dict() for s in samples])


def _synthetic(rounds: int = 20, saving: float = 0.10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    samples = []
    for block in range(rounds):
        drift = rng.normal(1.0, 0.05)  # shared by both configurations in a round
        for config, factor in (("baseline", 1.0), ("fast", 1.0 - saving)):
            latency = 0.1 * drift * factor * rng.normal(1.0, 0.005)
            samples.append(Sample(config, block, "latency_mean_s", latency, "s"))
            samples.append(Sample(config, block, "hooked_block_seconds", 1.0, "s"))
            for module, seconds in (("vision_encoder", 0.3), ("layers.0.mlp", 0.5)):
                samples.append(Sample(config, block, "module_time_s", seconds, "s", module=module))
            for i, modality in enumerate(("image", "text", "image")):
                samples.append(
                    Sample(
                        config,
                        block,
                        "latency_e2e_s",
                        latency * (2 if i != 1 else 1),
                        "s",
                        extra={"modality": modality},
                    )
                )
    samples.append(Sample("baseline", -1, "latency_cold_s", 0.5, "s"))
    return _frame(samples)


def test_comparison_recovers_a_planted_saving_despite_drift():
    result = analysis.comparisons(_synthetic(), baseline="baseline")
    row = result[result.metric == "latency_mean_s"].iloc[0]
    assert row.config == "fast"
    assert abs(row.delta - 0.10) < 0.01
    assert row.lo < 0.10 < row.hi


def test_module_shares_sum_to_one_with_other_as_the_rest():
    shares = module_shares(_synthetic())
    baseline = shares[shares.config == "baseline"].set_index("module")
    assert abs(baseline["share"].sum() - 1.0) < 1e-12
    assert abs(baseline.loc["vision_encoder", "share"] - 0.3) < 1e-12
    assert abs(baseline.loc["other", "share"] - 0.2) < 1e-12
    assert abs(baseline.loc["layers.0.mlp", "seconds"] - 0.5) < 1e-12
    assert set(baseline["rounds"]) == {20}


def test_module_share_is_a_ratio_of_means_not_a_mean_of_ratios():
    """Passes of 1 s and 3 s with 0.5 s of vision each: 1.0 / 4.0 = 25% of the time is
    vision. Averaging each pass's share would say (50% + 16.7%) / 2 = 33%."""
    samples = []
    for block, total in ((0, 1.0), (1, 3.0)):
        samples.append(Sample("baseline", block, "hooked_block_seconds", total, "s"))
        samples.append(
            Sample("baseline", block, "module_time_s", 0.5, "s", module="vision_encoder")
        )
    shares = module_shares(_frame(samples)).set_index("module")["share"]
    assert abs(shares["vision_encoder"] - 0.25) < 1e-12
    assert abs(shares["other"] - 0.75) < 1e-12


def test_summary_splits_per_request_latency_by_modality_and_keeps_cold_start():
    summary = analysis.summary_table(_synthetic())
    e2e = summary[(summary.metric == "latency_e2e_s") & (summary.config == "baseline")]
    assert set(e2e.modality) == {"image", "text"}
    assert (e2e.set_index("modality")["n"] == pd.Series({"image": 40, "text": 20})).all()
    cold = summary[summary.metric == "latency_cold_s"]
    assert len(cold) == 1 and cold.iloc[0]["median"] == 0.5


def test_flags_name_noisy_metrics_and_missing_energy():
    frame = _synthetic()
    # A third configuration whose blocks alternate between 0.1 s and 0.2 s: IQR/median ≈ 67%.
    noisy = [Sample("jumpy", b, "latency_mean_s", 0.1 if b % 2 else 0.2, "s") for b in range(20)]
    missing = [
        Sample("baseline", b, "energy_j", float("nan"), "J", source="estimated") for b in range(2)
    ]
    frame = pd.concat([frame, _frame(noisy + missing)], ignore_index=True)
    found = analysis.flags(frame, analysis.summary_table(frame))
    assert any("energy: 2 window(s)" in f for f in found)
    assert [f for f in found if f.startswith("noisy:") and "latency_mean_s" in f] == [
        "noisy: jumpy latency_mean_s: IQR/median 67% > 10%"
    ]


def test_a_tail_the_median_hides_is_flagged():
    """Mostly 100 ms blocks, a fifth of them 600 ms: the median and IQR look calm, the mean not."""
    values = [0.1] * 16 + [0.6] * 4
    samples = _frame(
        [Sample("baseline", block, "latency_mean_s", v, "s") for block, v in enumerate(values)]
    )
    summary = analysis.summary_table(samples)
    row = summary[summary.metric == "latency_mean_s"].iloc[0]
    assert row["median"] == 0.1 and row["iqr"] == 0.0 and row["mean"] == pytest.approx(0.2)
    assert bool(row["tail"]) is True
    (flag,) = analysis.tail_flags(summary)
    assert flag.startswith("tail: baseline latency_mean_s: mean 0.2 vs median 0.1")
    calm = analysis.summary_table(
        _frame([Sample("baseline", b, "latency_mean_s", 0.1 + 0.001 * b, "s") for b in range(20)])
    )
    assert not calm["tail"].astype(bool).any() and analysis.tail_flags(calm) == []


def test_per_modality_latency_shows_a_saving_only_where_it_happens():
    rng = np.random.default_rng(1)
    samples = []
    for block in range(20):
        drift = rng.normal(1.0, 0.05)
        for config, text_factor in (("baseline", 1.0), ("routed", 0.7)):
            samples.append(Sample(config, block, "latency_mean_s", 0.1 * drift, "s"))
            for modality, seconds in (("image", 0.2), ("text", 0.1 * text_factor)):
                value = seconds * drift * rng.normal(1.0, 0.005)
                extra = {"modality": modality}
                samples.append(Sample(config, block, "latency_e2e_s", value, "s", extra=extra))
    result = analysis.comparisons(_frame(samples), baseline="baseline").set_index("label")
    text, image = result.loc["latency, text requests"], result.loc["latency, image requests"]
    assert text.delta == pytest.approx(0.30, abs=0.01) and text.lo < 0.30 < text.hi
    assert abs(image.delta) < 0.01 and image.lo < 0 < image.hi
