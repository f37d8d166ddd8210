"""Seeds derive from the run's seed and keys, as NumPy's SeedSequence of those keys would."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.seeding import _key_int, derive_seed, derive_seeds, torch_generator

keys = st.lists(st.one_of(st.integers(0, 2**80), st.text(max_size=12)), max_size=5)


@given(st.integers(0, 2**70), keys)
def test_derive_seed_is_numpy_seed_sequence_of_the_keys(seed: int, ks: list) -> None:
    # The reference: SeedSequence given the keys as Python ints (NumPy's own conversion).
    ref = np.random.SeedSequence([_key_int(seed), *(_key_int(k) for k in ks)])
    assert derive_seed(seed, *ks) == int(ref.generate_state(1, dtype=np.uint64)[0] >> 1)


def test_derive_seed_is_stable_and_keyed() -> None:
    assert derive_seed(0, "client", 3, "client-007") == derive_seed(0, "client", 3, "client-007")
    assert derive_seed(0, "client", 3, "client-007") != derive_seed(0, "client", 4, "client-007")
    assert 0 <= derive_seed(2**64 + 1, "x") < 2**63
    a = torch_generator(1, "batches").initial_seed()
    assert a == derive_seed(1, "batches")


def test_negative_keys_are_refused() -> None:
    with pytest.raises(ValueError, match=r"derive_seed: keys must be >= 0 \(got -1\)"):
        derive_seed(0, -1)


@given(st.lists(st.tuples(st.integers(0, 2**70), keys), min_size=0, max_size=40))
def test_derive_seeds_equals_derive_seed_of_each_row(rows: list) -> None:
    flat = [(seed, *ks) for seed, ks in rows]
    assert derive_seeds(flat) == [derive_seed(*r) for r in flat]


def test_derive_seeds_hashes_a_cohort_together() -> None:
    # 100 rows of one length go through the array hash (not the per-row fallback).
    rows = [(7, "client", 3, f"client-{i:04d}") for i in range(100)] + [(1,), (2, "x")]
    assert derive_seeds(rows) == [derive_seed(*r) for r in rows]


@pytest.mark.parametrize("n_keys", [0, 1, 2, 3, 4, 5, 8])
def test_derive_seeds_array_hash_matches_for_short_and_long_entropy(n_keys: int) -> None:
    # Fewer words than SeedSequence's pool of four, exactly four, and more.
    rng = np.random.default_rng(n_keys)
    rows = [tuple(int(v) for v in rng.integers(0, 2**32, n_keys + 1)) for _ in range(20)]
    assert derive_seeds(rows) == [derive_seed(*r) for r in rows]
