"""The RDP accountant against published values, and its limiting cases."""

from __future__ import annotations

import math

import pytest

from models.privacy import (
    epsilon_from_rdp,
    noise_for_epsilon,
    privacy_spent,
    rdp_per_step,
)


def test_opacus_published_value():
    # Opacus's accountant test: sigma 1.5, q 0.04, 90 epochs (2,250 steps), delta 1e-5.
    spent = privacy_spent(1.5, 0.04, int(90 / 0.04), 1e-5)
    assert spent.epsilon == pytest.approx(7.32911117143, abs=1e-9)


def test_mixed_mechanisms_match_the_documented_example():
    # Opacus/TF Privacy's rdp module docstring: (q, sigma, steps) = (1e-5, 1.0, 10) then
    # (1e-4, 3.0, 4) over integer orders 2..32 give epsilon 0.336 at order 23 for delta 1e-5.
    orders = list(range(2, 33))
    rdp = [10 * rdp_per_step(1e-5, 1.0, a) + 4 * rdp_per_step(1e-4, 3.0, a) for a in orders]
    epsilon, order = epsilon_from_rdp(rdp, orders, 1e-5)
    assert epsilon == pytest.approx(0.336, abs=5e-4)
    assert order == 23


def test_full_batch_is_the_plain_gaussian_mechanism():
    # Without subsampling the Gaussian mechanism's RDP is alpha / (2 sigma^2), exactly.
    assert rdp_per_step(1.0, 2.0, 5.0) == pytest.approx(5 / 8)


def test_integer_and_fractional_orders_agree_where_they_meet():
    # The fractional series and the binomial sum are two forms of one integral.
    near = rdp_per_step(0.01, 1.2, 4.0 + 1e-6)
    assert near == pytest.approx(rdp_per_step(0.01, 1.2, 4.0), rel=1e-4)


def test_epsilon_grows_with_steps_and_falls_with_noise():
    base = privacy_spent(1.0, 0.01, 1000, 1e-5).epsilon
    assert privacy_spent(1.0, 0.01, 2000, 1e-5).epsilon > base
    assert privacy_spent(2.0, 0.01, 1000, 1e-5).epsilon < base
    assert rdp_per_step(0.0, 1.0, 2.0) == 0.0
    assert math.isinf(rdp_per_step(0.1, 0.0, 2.0))


def test_noise_for_epsilon_reaches_the_target_from_above():
    sigma = noise_for_epsilon(4.0, 0.02, 500, 1e-5, tolerance=1e-4)
    assert privacy_spent(sigma, 0.02, 500, 1e-5).epsilon <= 4.0
    assert privacy_spent(sigma - 1e-3, 0.02, 500, 1e-5).epsilon > 4.0
