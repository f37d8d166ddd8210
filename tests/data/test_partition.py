"""Partitioners: every example assigned exactly once, deterministic, skewed as documented."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shoal.data import partition as P
from shoal.errors import ConfigError, DataError

SETTINGS = settings(max_examples=60, deadline=None)


def assert_exact_cover(parts: list[np.ndarray] | dict[str, np.ndarray], n: int) -> None:
    arrays = list(parts.values()) if isinstance(parts, dict) else parts
    for a in arrays:
        assert a.dtype == np.int64 and a.ndim == 1
    allrows = np.concatenate(arrays) if arrays else np.empty(0, np.int64)
    assert allrows.shape == (n,), "some example assigned twice or left out"
    assert np.array_equal(np.sort(allrows), np.arange(n))


def label_mix(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    hist = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
    return hist / hist.sum(axis=1, keepdims=True)  # (clients, classes)


def mean_tv(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    prior = np.bincount(labels, minlength=num_classes) / labels.shape[0]
    return float(0.5 * np.abs(label_mix(labels, parts, num_classes) - prior).sum(axis=1).mean())


@st.composite
def labelled(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    n = draw(st.integers(1, 300))
    classes = draw(st.integers(1, 12))
    labels = np.array(draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)))
    k = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**32 - 1))
    return labels, k, seed


# -- exact cover (properties) -----------------------------------------------------------------

@SETTINGS
@given(labelled())
def test_iid_covers_every_example_once(case: tuple[np.ndarray, int, int]) -> None:
    labels, k, seed = case
    parts = P.iid(len(labels), k, np.random.default_rng(seed))
    assert_exact_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert len(parts) == k and max(sizes) - min(sizes) <= 1


@SETTINGS
@given(labelled(), st.floats(0.01, 100.0))
def test_dirichlet_covers_every_example_once(case: tuple[np.ndarray, int, int],
                                             alpha: float) -> None:
    labels, k, seed = case
    parts = P.dirichlet(labels, k, alpha, np.random.default_rng(seed))
    assert_exact_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert len(parts) == k and max(sizes) - min(sizes) <= 1  # near-equal sizes by design


@SETTINGS
@given(labelled(), st.integers(1, 5))
def test_shards_cover_every_example_once(case: tuple[np.ndarray, int, int], s: int) -> None:
    labels, k, seed = case
    assume(len(labels) >= s)
    k = min(k, len(labels) // s)
    parts = P.shards(labels, k, s, np.random.default_rng(seed))
    assert len(parts) == k
    assert_exact_cover(parts, len(labels))


@SETTINGS
@given(labelled(), st.floats(0.01, 100.0), st.integers(1, 3))
def test_quantity_skew_covers_every_example_once(case: tuple[np.ndarray, int, int],
                                                 alpha: float, min_size: int) -> None:
    labels, k, seed = case
    assume(len(labels) >= min_size)
    k = min(k, len(labels) // min_size)
    parts = P.quantity_skew(len(labels), k, alpha, np.random.default_rng(seed), min_size=min_size)
    assert len(parts) == k and min(len(p) for p in parts) >= min_size
    assert_exact_cover(parts, len(labels))


@SETTINGS
@given(st.lists(st.sampled_from(["va", "cleveland", "hungary", "b"]), min_size=1, max_size=200))
def test_natural_covers_every_example_once_in_sorted_order(groups: list[str]) -> None:
    parts = P.natural(groups)
    assert list(parts) == sorted(set(groups))
    assert_exact_cover(parts, len(groups))
    for gid, rows in parts.items():
        assert all(groups[r] == gid for r in rows)


def test_natural_integer_ids_become_strings() -> None:
    parts = P.natural(np.array([3, 1, 3, 2]))
    assert list(parts) == ["1", "2", "3"]
    assert parts["3"].tolist() == [0, 2]


# -- skew -------------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 500)  # 5,000 examples, 10 balanced classes


def test_dirichlet_small_alpha_skews_large_alpha_is_near_iid() -> None:
    rng = np.random.default_rng(0)
    skewed = P.dirichlet(LABELS, 50, 0.1, rng)
    flat = P.dirichlet(LABELS, 50, 1000.0, np.random.default_rng(0))
    iid = P.iid(len(LABELS), 50, np.random.default_rng(0))
    # Most clients of alpha=0.1 are dominated by one class; alpha=1000 looks like IID.
    assert np.median(label_mix(LABELS, skewed, 10).max(axis=1)) > 0.6
    assert mean_tv(LABELS, skewed, 10) > 0.6
    assert mean_tv(LABELS, flat, 10) < 1.5 * mean_tv(LABELS, iid, 10) + 0.02
    assert mean_tv(LABELS, flat, 10) < 0.2


def test_quantity_skew_small_alpha_gives_unequal_sizes() -> None:
    sizes = [len(p) for p in P.quantity_skew(5000, 50, 0.1, np.random.default_rng(0))]
    even = [len(p) for p in P.quantity_skew(5000, 50, 1000.0, np.random.default_rng(0))]
    # Coefficient of variation: > 1 for alpha=0.1; multinomial noise only (~0.1) for alpha=1000.
    assert np.std(sizes) / np.mean(sizes) > 1.0
    assert np.std(even) / np.mean(even) < 0.2


def test_shards_two_per_client_gives_at_most_two_classes() -> None:
    # 100 shards of 50 rows; shards never straddle a label boundary here.
    parts = P.shards(LABELS, 50, 2, np.random.default_rng(0))
    classes = [len(np.unique(LABELS[p])) for p in parts]
    assert max(classes) <= 2 and all(len(p) == 100 for p in parts)


def test_dirichlet_is_fast_for_a_thousand_clients() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 60_000)
    start = time.perf_counter()
    parts = P.dirichlet(labels, 1000, 0.3, np.random.default_rng(1))
    assert time.perf_counter() - start < 2.0
    assert_exact_cover(parts, 60_000)


# -- determinism ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,options", [
    ("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {"shards_per_client": 2}),
    ("quantity", {"alpha": 0.5}),
])
def test_same_seed_same_partition_other_seed_different(method: str, options: dict) -> None:
    def run(seed: int) -> dict[str, np.ndarray]:
        return P.partition(method, LABELS, 20, np.random.default_rng(seed), **options)

    a, b, c = run(7), run(7), run(8)
    assert list(a) == P.client_names(20)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_client_names_are_padded_to_the_width_of_the_last_id() -> None:
    assert P.client_names(3) == ["client-0", "client-1", "client-2"]
    assert P.client_names(20)[:2] == ["client-00", "client-01"]
    assert P.client_names(1000)[-1] == "client-999"
    assert P.client_names(1001)[0] == "client-0000"


def test_stratified_split_keeps_class_shares() -> None:
    labels = np.array([0] * 80 + [1] * 20)
    train, test = P.stratified_split(labels, 0.25, np.random.default_rng(0))
    assert np.bincount(labels[test]).tolist() == [20, 5]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))


# -- errors -----------------------------------------------------------------------------------

def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.mark.parametrize("call,message", [
    (lambda: P.partition("bogus", LABELS, 5, rng()),
     "partition: unknown method 'bogus'; expected one of dirichlet, iid, natural, quantity, "
     "shards."),
    (lambda: P.partition("dirichlet", LABELS, 5, rng(), alpha=0),
     "dirichlet: alpha must be a finite number > 0 (got 0)."),
    (lambda: P.partition("quantity", LABELS, 5, rng(), alpha=-1.0),
     "quantity: alpha must be a finite number > 0 (got -1.0)."),
    (lambda: P.partition("iid", LABELS, 0, rng()),
     "iid: num_clients must be >= 1 (got 0)."),
    (lambda: P.partition("iid", LABELS[:10], 11, rng()),
     "iid: 11 clients with at least 1 example(s) each need 11 examples, but there are only "
     "10; use fewer clients."),
    (lambda: P.partition("iid", LABELS, None, rng()),
     "partition 'iid': num_clients is required (got None)."),
    (lambda: P.partition("iid", LABELS, 5, rng(), alpha=0.5),
     "partition 'iid': unknown option 'alpha'; accepted options: none."),
    (lambda: P.partition("dirichlet", LABELS, 5, rng(), beta=0.5),
     "partition 'dirichlet': unknown option 'beta'; accepted options: alpha, min_size."),
    (lambda: P.partition("shards", LABELS[:100], 30, rng(), shards_per_client=4),
     "shards: 30 clients x 4 shards = 120 shards, but there are only 100 examples; use fewer "
     "clients or fewer shards per client."),
    (lambda: P.partition("shards", LABELS, 5, rng(), shards_per_client=0),
     "shards: shards_per_client must be an integer >= 1 (got 0)."),
    (lambda: P.partition("dirichlet", LABELS[:100], 10, rng(), min_size=11),
     "dirichlet: 10 clients with at least 11 example(s) each need 110 examples, but there "
     "are only 100; use fewer clients."),
    (lambda: P.partition("natural", LABELS, None, rng()),
     "partition 'natural': option groups is required (one group id per example, e.g. "
     "Task.groups); built-in tasks with natural client ids: ai4i, cmapss, gtsrb, heart."),
    (lambda: P.partition("natural", LABELS[:3], None, rng(), groups=["a", "b"]),
     "partition 'natural': groups has 2 entries but there are 3 examples; expected one group "
     "id per example."),
])
def test_bad_options_raise_config_error_with_exact_text(call, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert str(info.value) == message


def test_natural_rejects_a_wrong_client_count() -> None:
    assert list(P.partition("natural", LABELS[:3], 2, rng(), groups=["a", "b", "b"])) == ["a", "b"]
    with pytest.raises(ConfigError) as info:
        P.partition("natural", LABELS[:3], 3, rng(), groups=["a", "b", "b"])
    assert str(info.value) == ("partition 'natural': num_clients must be the number of groups "
                               "(2) or None (got 3); natural ids fix the clients.")


def test_labels_must_be_one_dimensional() -> None:
    with pytest.raises(DataError, match=r"labels must be 1-D, one per example \(got shape"):
        P.dirichlet(np.zeros((4, 2), dtype=int), 2, 1.0, rng())
