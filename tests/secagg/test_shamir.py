"""Shamir sharing: any t shares rebuild the secret; t - 1 shares reveal nothing about it."""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.secagg.errors import SecAggError
from shoal.secagg.shamir import PRIME, SHARE_BYTES, combine, combine_bytes, split, split_bytes


@settings(max_examples=30, deadline=None)
@given(secret=st.integers(0, PRIME - 1), n=st.integers(1, 12), data=st.data())
def test_any_t_shares_rebuild_the_secret(secret, n, data):
    t = data.draw(st.integers(1, n))
    xs = list(range(1, n + 1))
    shares = list(zip(xs, split(secret, xs, t), strict=True))
    subset = data.draw(st.permutations(shares))[:t]
    assert combine(subset) == secret


def test_bytes_round_trip_of_a_256_bit_secret():
    secret = secrets.token_bytes(32)
    shares = split_bytes(secret, [1, 2, 3, 4, 5], 3)
    assert all(len(s) == SHARE_BYTES for s in shares)
    for subset in itertools.combinations(zip([1, 2, 3, 4, 5], shares, strict=True), 3):
        assert combine_bytes(list(subset), 32) == secret


def test_t_minus_1_shares_are_consistent_with_every_secret():
    """In GF(97) with t = 3: given any 2 shares, each of the 97 possible values of the missing
    third share completes them to a different secret, so all 97 secrets remain exactly equally
    likely (the missing share is uniform): the 2 shares say nothing about the secret."""
    p, t = 97, 3
    xs = [5, 11, 60]
    for secret in (0, 42, 96):
        seen = split(secret, xs, t, prime=p)
        known = list(zip(xs[:t - 1], seen[:t - 1], strict=True))
        completions = {combine(known + [(xs[-1], y)], prime=p) for y in range(p)}
        assert completions == set(range(p))


def test_a_single_share_below_threshold_is_uniform_whatever_the_secret():
    """Chi-square test: with t = 2 in GF(11), the first share of secret 0 and of secret 7 are
    both uniform over the field."""
    p, draws = 11, 4400
    for secret in (0, 7):
        counts = np.bincount([split(secret, [1, 2], 2, prime=p)[0] for _ in range(draws)],
                             minlength=p)
        expected = draws / p
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 29.6  # 99.9th percentile of chi-square with 10 degrees of freedom


def test_bad_arguments_are_clear_errors():
    with pytest.raises(SecAggError, match=r"threshold must be in \[1, 3\] for 3 shares \(got 4\)"):
        split(1, [1, 2, 3], 4)
    with pytest.raises(SecAggError, match="share points must be distinct and nonzero"):
        split(1, [0, 1], 2)
    with pytest.raises(SecAggError, match="two shares have the same point"):
        combine([(1, 2), (1, 3)])
