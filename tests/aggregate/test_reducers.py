"""Reducers: exact weighting, permutation invariance, robustness against outliers, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shoal import tree
from shoal.aggregate import (
    coordinate_median,
    geometric_median,
    krum,
    multi_krum,
    trimmed_mean,
    trusted_mean,
    weighted_mean,
)
from shoal.errors import AggregationError, ConfigError

from ._strategies import random_updates, update_st, updates_st


def u(**tensors) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def _equal(a, b) -> bool:
    return tree.equal(a, b)


# --- weighted mean ----------------------------------------------------------------------------

def test_weighted_mean_by_examples_is_exact():
    a = u(w=[[1.0, 2.0], [0.0, -4.0]], b=[10.0])
    b = u(w=[[5.0, 6.0], [4.0, 8.0]], b=[2.0])
    # (1 * a + 3 * b) / 4
    got = weighted_mean()([a, b], [1, 3])
    assert _equal(got, u(w=[[4.0, 5.0], [3.0, 5.0]], b=[4.0]))
    # uniform: (a + b) / 2, whatever the clients reported
    got = weighted_mean("uniform")([a, b], [1, 3])
    assert _equal(got, u(w=[[3.0, 4.0], [2.0, 2.0]], b=[6.0]))


def test_weighted_mean_with_one_update_returns_it():
    a = u(w=[0.1, -0.7, 3.3])
    assert _equal(weighted_mean()([a], [1.0]), a)
    # 17 * x / 17 rounds twice, so it is only within an ulp of x.
    assert torch.allclose(weighted_mean()([a], [17.0])["w"], a["w"], rtol=1.2e-7, atol=0)


@settings(deadline=None, max_examples=40)
@given(updates_st(1, 6), st.lists(st.floats(0.5, 1000), min_size=6, max_size=6))
def test_weighted_mean_matches_float64_reference(updates, ws):
    ws = ws[:len(updates)]
    got = weighted_mean()(updates, ws)
    for k in got:
        num = sum(w * x[k].double() for x, w in zip(updates, ws, strict=True))
        ref = num / sum(ws)
        scale = sum(w * x[k].double().abs() for x, w in zip(updates, ws, strict=True)) / sum(ws)
        assert torch.all((got[k].double() - ref).abs() <= 1e-5 * scale + 1e-30), k


def test_weighted_mean_errors():
    a = u(w=[1.0])
    with pytest.raises(AggregationError) as e:
        weighted_mean()([a, a], [0, 0])
    assert str(e.value) == (
        "weighted_mean(): the total weight is 0.0; expected > 0 "
        "(every update came from a client with no examples)."
    )
    with pytest.raises(AggregationError) as e:
        weighted_mean()([a, a], [1.0])
    assert str(e.value) == "weighted_mean(): got 2 updates but 1 weights."
    with pytest.raises(AggregationError) as e:
        weighted_mean("uniform")([], [])
    assert str(e.value) == (
        "weighted_mean('uniform') needs at least 1 updates, got 0; "
        "sample more clients per round or raise min_replies."
    )
    with pytest.raises(ConfigError) as e:
        weighted_mean("median")  # type: ignore[arg-type]
    assert str(e.value) == (
        "weighted_mean: weighting must be 'examples' or 'uniform' (got 'median')."
    )


# --- coordinate median and trimmed mean -------------------------------------------------------

def test_coordinate_median_by_hand():
    xs = [u(w=[1.0, 4.0]), u(w=[5.0, 3.0]), u(w=[2.0, 2.0]), u(w=[10.0, 1.0])]
    # even count: per coordinate, the mean of the two middle values
    # coordinate 0: 1 2 | 5 10 -> 3.5; coordinate 1: 1 2 | 3 4 -> 2.5
    assert _equal(coordinate_median()(xs, [1] * 4), u(w=[3.5, 2.5]))
    # odd count: the middle value; coordinate 0: 1 2 [5] 10 100, coordinate 1: -9 1 [2] 3 4
    xs.append(u(w=[100.0, -9.0]))
    assert _equal(coordinate_median()(xs, [1] * 5), u(w=[5.0, 2.0]))


@settings(deadline=None, max_examples=40)
@given(updates_st(1, 8, lo=-1e6, hi=1e6))
def test_coordinate_median_equals_numpy_median(updates):
    # numpy also averages the two middle values of an even count; halving is exact, so the
    # float64 answer rounded to float32 is what a float32 (a + b) / 2 gives.
    got = coordinate_median()(updates, [1.0] * len(updates))
    for k in got:
        stacked = np.stack([x[k].double().numpy() for x in updates])
        ref = torch.from_numpy(np.asarray(np.median(stacked, axis=0))).float()
        assert torch.equal(got[k], ref), k


def test_trimmed_mean_by_hand():
    # n = 5, beta = 0.2: drop floor(0.2 * 5) = 1 value at each end per coordinate.
    xs = [u(w=[1.0, -50.0]), u(w=[2.0, 4.0]), u(w=[3.0, 5.0]), u(w=[4.0, 6.0]),
          u(w=[1000.0, 7.0])]
    assert _equal(trimmed_mean(0.2)(xs, [1] * 5), u(w=[3.0, 5.0]))
    # beta = 0.1: floor(0.5) = 0, nothing is dropped -> the plain mean
    assert _equal(trimmed_mean(0.1)(xs, [1] * 5), u(w=[202.0, -5.6]))


@settings(deadline=None, max_examples=40)
@given(updates_st(1, 8), st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45]))
def test_trimmed_mean_equals_scipy(updates, beta):
    got = trimmed_mean(beta)(updates, [1.0] * len(updates))
    for k in got:
        stacked = np.stack([x[k].double().numpy() for x in updates])
        ref = torch.from_numpy(np.asarray(scipy.stats.trim_mean(stacked, beta, axis=0)))
        assert torch.allclose(got[k].double(), ref, rtol=1e-5, atol=1e-4), k


@settings(deadline=None, max_examples=40)
@given(updates_st(1, 8))
def test_trimmed_mean_0_is_the_mean(updates):
    n = len(updates)
    got = trimmed_mean(0)(updates, [float(i + 1) for i in range(n)])  # weights are ignored
    # Not bit-identical: trimmed_mean sums each coordinate in sorted order, the mean in input
    # order, and float addition is not associative.
    ref = weighted_mean("uniform")(updates, [1.0] * n)
    for k in got:
        assert torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-4), k


@settings(deadline=None, max_examples=40)
@given(st.lists(update_st(lo=-1000, hi=1000).map(lambda x: tree.map_params(torch.round, x)),
                min_size=1, max_size=8))
def test_trimmed_mean_0_is_the_mean_exactly_on_integers(updates):
    # With small integers every partial sum is exact, so the summation order cannot matter.
    got = trimmed_mean(0)(updates, [1.0] * len(updates))
    for k in got:
        assert torch.equal(got[k], torch.stack([x[k] for x in updates]).mean(dim=0)), k


def test_trimmed_mean_config_error():
    for beta in (0.5, -0.1, 1.0):
        with pytest.raises(ConfigError) as e:
            trimmed_mean(beta)
        assert str(e.value) == f"trimmed_mean: beta must be in [0, 0.5) (got {beta})."


# --- Krum -------------------------------------------------------------------------------------

def test_krum_scores_by_hand():
    # f = 1, n = 5: each score sums the squared distances to the n - f - 2 = 2 nearest others.
    #   0: 1² + 3² = 10;  1: 1² + 2² = 5;  3: 2² + 3² = 13;  7: 4² + 6² = 52;  20: 13² + 17² = 458
    xs = [u(w=[x]) for x in (0.0, 1.0, 3.0, 7.0, 20.0)]
    assert krum(1).scores(xs).tolist() == [10.0, 5.0, 13.0, 52.0, 458.0]
    assert _equal(krum(1)(xs, [1] * 5), u(w=[1.0]))
    assert _equal(multi_krum(1, 2)(xs, [1] * 5), u(w=[0.5]))           # mean of 1 and 0
    assert torch.allclose(multi_krum(1, 3)(xs, [1] * 5)["w"], torch.tensor([4 / 3]))  # 1, 0, 3


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), f=st.integers(0, 2), extra=st.integers(0, 4),
       m=st.integers(1, 4))
def test_multi_krum_averages_the_m_best_scored(seed, f, extra, m):
    n = 2 * f + 3 + extra
    m = min(m, n)
    xs = random_updates(n, seed)
    scores = multi_krum(f, m).scores(xs)
    best = scores.argsort()[:m].tolist()
    ref = tree.scale(tree.weighted_sum([xs[i] for i in best], [1.0] * m), 1.0 / m)
    got = multi_krum(f, m)(xs, [1.0] * n)
    assert _equal(got, ref)
    if m == 1:
        assert _equal(krum(f)(xs, [1.0] * n), xs[best[0]])  # Krum returns an update as is


def test_krum_needs_2f_plus_3_updates():
    xs = random_updates(4, seed=0)
    with pytest.raises(AggregationError) as e:
        krum(1)(xs, [1.0] * 4)
    assert str(e.value) == (
        "krum(f=1) needs at least 5 updates, got 4; "
        "sample more clients per round or raise min_replies."
    )
    krum(1)(random_updates(5, seed=0), [1.0] * 5)  # 2f + 3 is enough
    # Multi-Krum averages m of the n - f updates it trusts: it needs n >= m + f.
    with pytest.raises(AggregationError) as e:
        multi_krum(1, 6)(random_updates(5, seed=0), [1.0] * 5)
    assert str(e.value) == (
        "multi_krum(f=1, m=6) needs at least 7 updates, got 5; "
        "sample more clients per round or raise min_replies."
    )


def test_krum_config_errors():
    with pytest.raises(ConfigError) as e:
        krum(-1)
    assert str(e.value) == "krum: f (Byzantine clients tolerated) must be >= 0 (got -1)."
    with pytest.raises(ConfigError) as e:
        multi_krum(1, 0)
    assert str(e.value) == "multi_krum: m (updates averaged) must be >= 1 (got 0)."


# --- robustness on a toy problem --------------------------------------------------------------

def _honest_and_attackers(attack: str) -> tuple[list, list]:
    g = torch.Generator().manual_seed(1)
    honest = [{"w": 1 + 0.05 * torch.randn(2, 3, generator=g),
               "b": 1 + 0.05 * torch.randn(3, generator=g)} for _ in range(8)]
    if attack == "sign_flip":  # -100 times the honest direction
        bad = [{k: torch.full_like(v, -100.0) for k, v in honest[0].items()} for _ in range(2)]
    else:  # "large": a huge update in a random direction
        bad = [{k: 1e4 * torch.randn(v.shape, generator=g) for k, v in honest[0].items()}
               for _ in range(2)]
    return honest, bad


@pytest.mark.parametrize("attack", ["sign_flip", "large"])
@pytest.mark.parametrize("reducer", [coordinate_median(), trimmed_mean(0.2), krum(2),
                                     multi_krum(2, 5)], ids=repr)
def test_robust_reducers_ignore_outliers(reducer, attack):
    honest, bad = _honest_and_attackers(attack)
    xs = honest[:4] + bad[:1] + honest[4:] + bad[1:]  # attackers are not at the end
    # The attackers also claim many examples: robust reducers ignore the weights.
    weights = [10.0] * 4 + [1e6] + [10.0] * 4 + [1e6]
    got = reducer(xs, weights)
    for k, v in got.items():
        assert torch.all((v - 1).abs() < 0.2), (k, v)
    if repr(reducer).startswith("krum("):
        assert any(_equal(got, h) for h in honest)  # Krum picks an honest update, as is


@pytest.mark.parametrize("attack", ["sign_flip", "large"])
def test_weighted_mean_is_dragged_by_outliers(attack):
    honest, bad = _honest_and_attackers(attack)
    got = weighted_mean("uniform")(honest + bad, [1.0] * 10)
    assert max(float((v - 1).abs().max()) for v in got.values()) > 10


def test_krum_picks_an_honest_update_with_the_lowest_score():
    honest, bad = _honest_and_attackers("sign_flip")
    xs = bad + honest
    scores = krum(2).scores(xs)
    assert scores[:2].min() > scores[2:].max()  # both attackers score worse than any honest
    assert _equal(krum(2)(xs, [1.0] * 10), xs[int(scores.argmin())])


# --- permutation invariance -------------------------------------------------------------------

@settings(deadline=None, max_examples=40)
@given(updates_st(1, 8), st.data())
def test_weighted_mean_is_permutation_invariant_up_to_rounding(updates, data):
    n = len(updates)
    ws = data.draw(st.lists(st.floats(0.5, 100), min_size=n, max_size=n))
    perm = data.draw(st.permutations(range(n)))
    a = weighted_mean()(updates, ws)
    b = weighted_mean()([updates[i] for i in perm], [ws[i] for i in perm])
    # The weighted sum accumulates in float32 in the given order; float addition is not
    # associative, so another order rounds differently and the result can differ in the last
    # bits. The error is bounded by ~n * eps * sum(w * |x|) / sum(w).
    for k in a:
        scale = sum(w * x[k].abs() for x, w in zip(updates, ws, strict=True)) / sum(ws)
        assert torch.all((a[k] - b[k]).abs() <= 1e-5 * scale + 1e-30), k


@settings(deadline=None, max_examples=40)
@given(updates_st(1, 9), st.data(),
       st.sampled_from([coordinate_median(), trimmed_mean(0), trimmed_mean(0.2),
                        trimmed_mean(0.4)]))
def test_sort_based_reducers_are_permutation_invariant_exactly(updates, data, reducer):
    # Sorting each coordinate first makes the input order irrelevant: the same values are
    # averaged in the same order, so the result is bit-identical.
    n = len(updates)
    perm = data.draw(st.permutations(range(n)))
    a = reducer(updates, [1.0] * n)
    b = reducer([updates[i] for i in perm], [float(i) for i in range(n)])
    assert _equal(a, b)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), f=st.integers(0, 2), extra=st.integers(0, 6),
       m=st.integers(1, 3), data=st.data())
def test_krum_is_permutation_invariant_exactly(seed, f, extra, m, data):
    # n <= 25 here. For more rows torch.cdist switches to a matrix-multiply formula whose
    # rounding depends on the rows' positions, so the scores are then invariant only to
    # ~1e-16 relative (see the report on Krum.scores).
    n = 2 * f + 3 + extra
    xs = random_updates(n, seed)
    perm = data.draw(st.permutations(range(n)))
    scores = krum(f).scores(xs)
    # Scores are computed pairwise: permuting the updates permutes the scores exactly.
    assert torch.equal(krum(f).scores([xs[i] for i in perm]), scores[perm])
    # With tied scores Krum picks the first of the tied updates, which depends on the order;
    # Gaussian updates are never tied in practice.
    assume(len(set(scores.tolist())) == n)
    a = multi_krum(f, m)(xs, [1.0] * n)
    b = multi_krum(f, m)([xs[i] for i in perm], [1.0] * n)
    assert _equal(a, b)


def test_krum_with_tied_scores_picks_a_minimal_update():
    # 1, 2 and 3 tie (score 2 each); whichever order, the pick is one of them.
    xs = [u(w=[x]) for x in (0.0, 1.0, 2.0, 3.0, 4.0)]
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 3, 1]):
        got = krum(1)([xs[i] for i in order], [1.0] * 5)
        assert float(got["w"]) in (1.0, 2.0, 3.0)


def test_reducer_reprs_and_linearity():
    assert [repr(r) for r in (weighted_mean(), weighted_mean("uniform"), coordinate_median(),
                              trimmed_mean(0.1), krum(1), multi_krum(2, 3))] == [
        "weighted_mean()", "weighted_mean('uniform')", "coordinate_median()",
        "trimmed_mean(0.1)", "krum(f=1)", "multi_krum(f=2, m=3)"]
    assert weighted_mean().linear and weighted_mean("uniform").linear
    assert not any(r.linear for r in (coordinate_median(), trimmed_mean(0.1), krum(1)))


# --- geometric median -------------------------------------------------------------------------

def test_geometric_median_of_collinear_points_is_their_median():
    # On a line the geometric median is the (weighted) 1-D median.
    xs = [u(w=[float(v), 0.0]) for v in (0, 1, 2, 10, 100)]
    got = geometric_median()(xs, [1.0] * 5)
    assert abs(float(got["w"][0]) - 2.0) < 1e-3 and abs(float(got["w"][1])) < 1e-6


def test_geometric_median_minimises_the_sum_of_distances():
    g = torch.Generator().manual_seed(0)
    xs = [{"w": torch.randn(4, generator=g)} for _ in range(7)]
    ws = [1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 2.0]
    z = geometric_median()(xs, ws)["w"].double()

    def cost(p: torch.Tensor) -> float:
        return sum(w * float((p - x["w"].double()).norm()) for x, w in zip(xs, ws, strict=True))
    for _ in range(50):  # no nearby point does better
        assert cost(z) <= cost(z + 1e-2 * torch.randn(4, generator=g, dtype=torch.float64)) + 1e-9


@pytest.mark.parametrize("attack", ["sign_flip", "large"])
def test_geometric_median_ignores_a_minority_of_outliers(attack):
    honest, bad = _honest_and_attackers(attack)
    got = geometric_median()(honest + bad, [1.0] * 10)
    for v in got.values():
        assert torch.all((v - 1).abs() < 0.2)


def test_geometric_median_errors():
    with pytest.raises(ConfigError, match=r"geometric_median: max_iter must be >= 1 \(got 0\)"):
        geometric_median(0)
    with pytest.raises(AggregationError, match="every weight must be > 0"):
        geometric_median()([u(w=[1.0]), u(w=[2.0])], [1.0, 0.0])


# --- FLTrust's trusted mean -------------------------------------------------------------------

def test_trusted_mean_by_hand():
    ref = u(w=[1.0, 0.0])
    xs = [u(w=[2.0, 0.0]), u(w=[0.0, 3.0]), u(w=[-5.0, 0.0]), u(w=[1.0, 1.0])]
    r = trusted_mean(ref)
    got = r(xs, [1.0, 1e9, 1e9, 1.0])  # weights ignored
    # trust: cos = 1, 0, -1 -> 0, 1/sqrt(2); each rescaled to the reference's norm 1
    t = [1.0, 0.0, 0.0, 2 ** -0.5]
    want = (1.0 * torch.tensor([1.0, 0.0]) + t[3] * torch.tensor([1.0, 1.0]) / 2 ** 0.5) / (1 + t[3])
    assert torch.allclose(got["w"], want.float(), atol=1e-6)
    assert r.last_trust == pytest.approx(t)


def test_trusted_mean_of_untrusted_updates_is_zero():
    got = trusted_mean(u(w=[1.0, 1.0]))([u(w=[-1.0, -2.0]), u(w=[-3.0, 0.0])], [1.0, 1.0])
    assert torch.equal(got["w"], torch.zeros(2))
