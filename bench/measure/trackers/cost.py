"""Derived figures: cost from device time, carbon from energy. Labelled as such.

Both multiply a measurement by a user-supplied or published constant (a price, a
grid intensity), so neither is a measurement. A carbon figure computed from
estimated energy is itself estimated; from measured energy it is derived.
"""

from __future__ import annotations

from core.samples import Sample, Source

# CodeCarbon's world-average grid carbon intensity, used when no region is given.
WORLD_GRID_G_PER_KWH = 475.0
_JOULES_PER_KWH = 3.6e6


def cost_per_1k_requests(
    device_seconds: float, n_requests: int, price_per_device_hour: float
) -> float:
    """Dollars per 1000 requests when `n_requests` took `device_seconds` of a device."""
    if n_requests <= 0:
        raise ValueError(f"n_requests must be positive, got {n_requests}")
    return device_seconds / 3600.0 * price_per_device_hour / n_requests * 1000.0


def carbon_grams(energy_j: float, grid_g_per_kwh: float = WORLD_GRID_G_PER_KWH) -> float:
    """Grams of CO2-equivalent for `energy_j` joules at a grid intensity in gCO2/kWh."""
    return energy_j / _JOULES_PER_KWH * grid_g_per_kwh


def cost_sample(
    config: str,
    block: int,
    *,
    device_seconds: float,
    n_requests: int,
    price_per_device_hour: float,
    t_start: float = 0.0,
    t_end: float = 0.0,
) -> Sample:
    """A "cost_usd_per_1k" Sample (derived) from one block's device time and requests."""
    return Sample(
        config=config,
        block=block,
        metric="cost_usd_per_1k",
        value=cost_per_1k_requests(device_seconds, n_requests, price_per_device_hour),
        unit="USD",
        source="derived",
        t_start=t_start,
        t_end=t_end,
        extra={
            "method": "device_seconds / 3600 × price_per_device_hour / n_requests × 1000",
            "device_seconds": device_seconds,
            "n_requests": n_requests,
            "price_per_device_hour": price_per_device_hour,
        },
    )


def carbon_sample(energy: Sample, grid_g_per_kwh: float = WORLD_GRID_G_PER_KWH) -> Sample:
    """A "co2_g" Sample from an "energy_j" Sample: same config, block, module and window.

    Estimated energy gives an estimated carbon figure; anything else gives derived.
    """
    if energy.metric != "energy_j":
        raise ValueError(f"carbon needs an energy_j sample, got {energy.metric!r}")
    source: Source = "estimated" if energy.source == "estimated" else "derived"
    return Sample(
        config=energy.config,
        block=energy.block,
        metric="co2_g",
        value=carbon_grams(energy.value, grid_g_per_kwh),
        unit="gCO2e",
        module=energy.module,
        source=source,
        t_start=energy.t_start,
        t_end=energy.t_end,
        extra={
            "method": "energy_j / 3.6e6 × grid_g_per_kwh",
            "energy_j": energy.value,
            "energy_source": energy.source,
            "energy_meter": energy.extra.get("meter"),
            "grid_g_per_kwh": grid_g_per_kwh,
        },
    )
