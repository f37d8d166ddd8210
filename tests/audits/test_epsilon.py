"""One-run ε auditing (Steinke, Nasr & Jagielski 2023): the p-value matches the paper's
Algorithm 2 written with scipy, the δ = 0 bound with every guess right solves the binomial
tail by hand, chance-level scores give ≈ 0, and a simulated ε-DP randomized response is never
over-reported (beyond the confidence level) while its bound grows with ε."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from shoal.audits.epsilon import (
    OneRunBound,
    best_lower_bound,
    canary_mask,
    default_grid,
    one_run_epsilon_from_counts,
    one_run_epsilon_lower_bound,
    one_run_guesses,
    one_run_p_value,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's ``p_value_DP_audit`` (Algorithm 2), with scipy's binomial."""
    q = 1 / (1 + math.exp(-eps))
    beta = scipy.stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += scipy.stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return float(min(beta + alpha * delta * 2 * m, 1.0))


def randomized_response(included: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """Scores of an ε-DP mechanism: each canary's bit, flipped with probability 1/(1+e^ε),
    plus a tiny independent jitter (post-processing) so ties break at random."""
    g = torch.Generator().manual_seed(10_000 + seed)
    flip = torch.rand(len(included), generator=g) < 1 / (1 + math.exp(eps))
    bit = (included ^ flip).double()
    return bit + 1e-3 * torch.rand(len(included), generator=g, dtype=torch.float64)


def test_canary_mask_is_fair_and_seeded():
    a = canary_mask(10_000, 3)
    assert a.dtype == torch.bool and a.shape == (10_000,)
    assert torch.equal(a, canary_mask(10_000, 3)) and not torch.equal(a, canary_mask(10_000, 4))
    assert abs(a.double().mean().item() - 0.5) < 0.02


def test_guesses_top_and_bottom():
    t = one_run_guesses(torch.tensor([0.1, 5.0, -3.0, 2.0, 0.0]), k_plus=2, k_minus=1)
    assert t.tolist() == [0, 1, -1, 1, 0]
    assert one_run_guesses([1.0, 2.0], k_plus=0, k_minus=0).tolist() == [0, 0]
    with pytest.raises(ValueError):
        one_run_guesses([1.0, 2.0], k_plus=2, k_minus=1)


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (1000, 100, 90, 1.0, 1e-5), (1000, 100, 90, 2.0, 1e-5), (1000, 500, 400, 0.5, 1e-6),
    (100, 20, 20, 3.0, 0.0), (1000, 100, 60, 0.3, 1e-4), (50, 50, 0, 1.0, 1e-3),
])
def test_p_value_matches_paper_algorithm(m, r, v, eps, delta):
    assert one_run_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) == \
        pytest.approx(paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("r,confidence", [(10, 0.95), (20, 0.95), (40, 0.99), (200, 0.9)])
def test_all_correct_delta0_solves_binomial_tail(r, confidence):
    # All r guesses right: P[Binomial(r, q) >= r] = q^r = 1 - confidence.
    m = 4 * r
    included = canary_mask(m, 0)
    scores = included.double()
    k = r // 2
    assert int(included.sum()) >= k and int((~included).sum()) >= r - k
    bound = one_run_epsilon_lower_bound(scores, included, k_plus=k, k_minus=r - k, delta=0.0,
                                        confidence=confidence)
    q = (1 - confidence) ** (1 / r)
    assert bound == pytest.approx(math.log(q / (1 - q)), abs=1e-7)
    q_bound = 1 / (1 + math.exp(-bound))
    assert scipy.stats.binom.sf(r - 1, r, q_bound) == pytest.approx(1 - confidence, rel=1e-6)


def test_chance_scores_give_about_zero():
    m = 1000
    bounds = []
    for seed in range(20):
        included = canary_mask(m, seed)
        scores = torch.rand(m, generator=torch.Generator().manual_seed(500 + seed))
        bounds.append(one_run_epsilon_lower_bound(scores, included, k_plus=100, k_minus=100,
                                                  delta=1e-5))
        assert best_lower_bound(scores, included, 1e-5).epsilon <= 0.2
    assert max(bounds) <= 0.2
    assert sum(b > 0 for b in bounds) <= 3     # 5% level: about 1 in 20 expected


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_randomized_response_never_over_reported_and_grows(delta):
    m, seeds = 1000, 20
    means = []
    for eps in (1.0, 2.0, 4.0):
        bounds = []
        for seed in range(seeds):
            included = canary_mask(m, seed)
            scores = randomized_response(included, eps, seed)
            bounds.append(one_run_epsilon_lower_bound(scores, included, k_plus=250,
                                                      k_minus=250, delta=delta))
        over = sum(b > eps for b in bounds)
        assert over <= 3, (eps, bounds)          # confidence 0.95: about 1 in 20 expected
        means.append(float(np.mean(bounds)))
    assert means[0] < means[1] < means[2], means
    assert means[0] > 0.3 and means[2] > 2.0, means


def test_best_lower_bound_union_bound_and_rr():
    m = 1000
    included = canary_mask(m, 1)
    scores = randomized_response(included, 2.0, 1)
    best = best_lower_bound(scores, included, 1e-5)
    assert isinstance(best, OneRunBound)
    assert best.grid_size == len(default_grid(m))
    assert best.confidence == pytest.approx(1 - 0.05 / best.grid_size)
    # The reported bound is the fixed-k bound at the union-bound-adjusted confidence.
    assert best.epsilon == one_run_epsilon_lower_bound(
        scores, included, k_plus=best.k_plus, k_minus=best.k_minus, delta=1e-5,
        confidence=best.confidence)
    assert 0.5 < best.epsilon <= 2.0
    # A one-candidate grid pays no union bound.
    one = best_lower_bound(scores, included, 1e-5, grid=[(250, 250)])
    assert one.confidence == pytest.approx(0.95)
    assert one.epsilon == one_run_epsilon_lower_bound(scores, included, k_plus=250,
                                                      k_minus=250, delta=1e-5)


@pytest.mark.parametrize("delta", [0.0, 1e-6, 1e-4])
def test_monotone_in_correct_guesses(delta):
    m, r = 1000, 200
    bounds = [one_run_epsilon_from_counts(m=m, r=r, v=v, delta=delta) for v in range(r + 1)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[r // 2] == 0.0 and bounds[-1] > 2.0


def test_monotone_through_scores_and_delta():
    m = 400
    included = canary_mask(m, 7)
    scores = included.double() + 1e-3 * torch.arange(m, dtype=torch.float64) / m
    order = torch.argsort(scores, descending=True)
    prev = math.inf
    for wrong in range(0, 40, 5):
        s = scores.clone()
        s[order[:wrong]] -= 2.0                  # these top included canaries now score lowest
        b = one_run_epsilon_lower_bound(s, included, k_plus=50, k_minus=50, delta=0.0)
        assert b <= prev
        prev = b
    # More δ can only weaken the bound.
    bs = [one_run_epsilon_from_counts(m=m, r=100, v=90, delta=d) for d in (0, 1e-6, 1e-4, 1e-3)]
    assert all(a >= b for a, b in zip(bs, bs[1:], strict=False))


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        one_run_epsilon_from_counts(m=10, r=5, v=6, delta=0.0)
    with pytest.raises(ValueError):
        one_run_epsilon_from_counts(m=10, r=5, v=5, delta=0.0, confidence=1.0)
    with pytest.raises(ValueError):
        one_run_epsilon_lower_bound([1.0, 2.0], [True], k_plus=1, k_minus=0, delta=0.0)
    with pytest.raises(ValueError):
        best_lower_bound([1.0, 2.0], [True, False], 0.0, grid=[])
