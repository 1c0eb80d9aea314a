"""Privacy accounting for DP-SGD: Rényi DP of the sampled Gaussian mechanism, then (ε, δ).

Each DP-SGD step samples every example of the private set with probability q (Poisson), clips
each sampled example's gradient to L2 norm C and adds N(0, (σC)²) noise to their sum. Its RDP
at order α is log(A_α)/(α − 1), with A_α from Mironov, Talwar and Zhang, "Rényi Differential
Privacy of the Sampled Gaussian Mechanism" (2019), §3.3: a binomial sum for integer α, two
series of erfc terms for fractional α. RDP adds over steps; the conversion to (ε, δ) is
Theorem 21 of Balle et al., "Hypothesis Testing Interpretations and Rényi Differential
Privacy" (AISTATS 2020), minimised over the orders. These are the formulas Opacus and
TensorFlow Privacy use; `tests/test_privacy.py` checks published values of both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

# Opacus's default orders: fine steps where small noise puts the optimum, integers beyond.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(x) for x in range(12, 64)]
)


def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b) without overflow."""
    low, high = min(a, b), max(a, b)
    if low == -math.inf:
        return high
    return high + math.log1p(math.exp(low - high))


def _log_sub(a: float, b: float) -> float:
    """log(e^a − e^b) for a ≥ b."""
    if b == -math.inf:
        return a
    if a <= b:
        return -math.inf
    try:
        return b + math.log(math.expm1(a - b))
    except OverflowError:
        return a


def _log_erfc(x: float) -> float:
    return math.log(2.0) + float(special.log_ndtr(-x * math.sqrt(2.0)))


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_α = log Σ_k C(α,k) q^k (1−q)^(α−k) exp((k²−k)/(2σ²))."""
    total = -math.inf
    for k in range(alpha + 1):
        term = (
            math.log(special.binom(alpha, k))
            + k * math.log(q)
            + (alpha - k) * math.log(1 - q)
            + (k * k - k) / (2 * sigma**2)
        )
        total = _log_add(total, term)
    return total


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_α for fractional α: the integral split at z₀ where the two Gaussians' densities
    weigh equally, each half a series in generalised binomial coefficients, summed until its
    terms fall below e^−30."""
    below, above = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    k = 0
    while True:
        coefficient = special.binom(alpha, k)
        log_coefficient = math.log(abs(coefficient))
        j = alpha - k
        term_below = (
            log_coefficient
            + k * math.log(q)
            + j * math.log(1 - q)
            + (k * k - k) / (2 * sigma**2)
            + math.log(0.5)
            + _log_erfc((k - z0) / (math.sqrt(2) * sigma))
        )
        term_above = (
            log_coefficient
            + j * math.log(q)
            + k * math.log(1 - q)
            + (j * j - j) / (2 * sigma**2)
            + math.log(0.5)
            + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        )
        if coefficient > 0:
            below, above = _log_add(below, term_below), _log_add(above, term_above)
        else:
            below, above = _log_sub(below, term_below), _log_sub(above, term_above)
        k += 1
        if max(term_below, term_above) < -30:
            return _log_add(below, above)


def rdp_per_step(q: float, sigma: float, order: float) -> float:
    """RDP of one step of the sampled Gaussian mechanism at `order` (> 1)."""
    if q == 0:
        return 0.0
    if sigma == 0 or math.isinf(order):
        return math.inf
    if q == 1.0:
        return order / (2 * sigma**2)
    if float(order).is_integer():
        log_a = _log_a_integer(q, sigma, int(order))
    else:
        log_a = _log_a_fractional(q, sigma, order)
    return log_a / (order - 1)


def epsilon_from_rdp(
    rdp: Sequence[float], orders: Sequence[float], delta: float
) -> tuple[float, float]:
    """The smallest ε over the orders for this δ (Balle et al. 2020, Thm 21), and its order."""
    alphas = np.asarray(orders, dtype=float)
    values = np.asarray(rdp, dtype=float)
    eps = values - (math.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return float(eps[best]), float(alphas[best])


@dataclass(frozen=True)
class PrivacySpent:
    """What a DP training run spent: (ε, δ) and the mechanism that produced it."""

    epsilon: float
    delta: float
    order: float  # the RDP order that gave the smallest ε
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str = (
        "RDP of the sampled Gaussian mechanism (Mironov et al. 2019; Balle et al. 2020)"
    )


def privacy_spent(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> PrivacySpent:
    """(ε, δ) after `steps` DP-SGD steps at noise multiplier σ and Poisson sampling rate q."""
    per_step = [rdp_per_step(sample_rate, noise_multiplier, order) for order in orders]
    epsilon, order = epsilon_from_rdp([steps * r for r in per_step], orders, delta)
    return PrivacySpent(epsilon, delta, order, noise_multiplier, sample_rate, steps)


def noise_for_epsilon(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    *,
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to `tolerance`) whose ε after `steps` is ≤ the target."""
    low, high = 0.0, 10.0
    while privacy_spent(high, sample_rate, steps, delta).epsilon > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches ε={target_epsilon}")
    while high - low > tolerance:
        middle = (low + high) / 2
        if privacy_spent(middle, sample_rate, steps, delta).epsilon > target_epsilon:
            low = middle
        else:
            high = middle
    return high
