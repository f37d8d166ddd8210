"""Clipping and stochastic quantization: unbiased, within the stated bound, never wrapping."""

from __future__ import annotations

import numpy as np

from shoal.secagg.quantize import dequantize, error_bound, levels_for, quantize


def test_dequantized_sum_error_is_within_the_stated_bound():
    rng = np.random.default_rng(0)
    n, d, bound = 50, 2000, 1.5
    levels = levels_for(n)
    xs = [rng.normal(scale=1.0, size=d) for _ in range(n)]
    total = np.zeros(d, np.uint32)
    for i, x in enumerate(xs):
        total += quantize([(x, bound)], levels, np.random.default_rng(100 + i))
    (got,) = dequantize(total, [(d, bound)], levels)
    exact = np.sum([np.clip(x, -bound, bound) for x in xs], axis=0)
    err = np.abs(got - exact)
    assert err.max() < error_bound(n, bound, levels)
    # Independent roundings: the spread is about sqrt(n) steps, far below the worst case.
    assert err.std() < 2 * np.sqrt(n) * bound / levels


def test_stochastic_rounding_is_unbiased():
    levels = 10  # coarse, so the bias of deterministic rounding would show
    x = np.full(200_000, 0.237)
    q = quantize([(x, 1.0)], levels, np.random.default_rng(1))
    (v,) = dequantize(q, [(x.size, 1.0)], levels)
    np.testing.assert_allclose(np.unique(v), [0.2, 0.3])
    assert abs(v.mean() - 0.237) < 4 * 0.05 / np.sqrt(x.size)


def test_the_ring_is_sized_so_the_sum_cannot_wrap():
    n = 1000
    levels = levels_for(n)
    for sign in (1.0, -1.0):
        total = np.zeros(3, np.uint32)
        for i in range(n):
            total += quantize([(np.full(3, sign * 5.0), 2.0)], levels, np.random.default_rng(i))
        (v,) = dequantize(total, [(3, 2.0)], levels)
        np.testing.assert_allclose(v, sign * 2.0 * n)  # clipped to the bound, summed exactly
    assert n * levels < 2**31
