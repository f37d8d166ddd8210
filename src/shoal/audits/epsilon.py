"""An empirical lower bound on ε from one training run (Steinke, Nasr & Jagielski 2023,
"Privacy auditing with one (1) training run", NeurIPS).

The audit inserts ``m`` canaries, each included in the training data independently with
probability 1/2 (:func:`canary_mask`), trains once, and scores every canary (a membership
score such as ``-loss`` from :mod:`shoal.audits.membership`: higher means "more likely
included"). The auditor guesses "included" for the ``k_plus`` highest-scored canaries,
"excluded" for the ``k_minus`` lowest-scored ones and abstains on the rest
(:func:`one_run_guesses`); of its ``r = k_plus + k_minus`` guesses ``v`` are correct. An
``(ε, δ)``-DP training cannot make many more of them correct than ``r`` coin flips that are
right with probability ``e^ε / (1 + e^ε)``.

The statement implemented is the paper's main theorem (Theorem 3.1 in the arXiv version,
2305.08846), exactly as its Algorithm 2 (the p-value and ε search in the paper's appendix)
computes it. Let ``S ∈ {-1, +1}^m`` be uniform (``+1``: canary included), ``T ∈ {-1, 0, +1}^m``
the guesses, a post-processing of the output of an algorithm that is ``(ε, δ)``-DP with
respect to the canaries, with ``‖T‖₁ ≤ r`` always, and ``W = Σ_i max(0, T_i S_i)`` the number
of correct guesses. With ``f(v) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v]``, for every ``v``::

    P[W ≥ v] ≤ f(v) + 2 m δ · max_{i = 1..m} (f(v - i) - f(v)) / i

(for ``δ = 0``: ``W`` is stochastically dominated by ``Binomial(r, e^ε/(1+e^ε))``). The
right-hand side is the p-value of the observed ``v`` under the hypothesis "the training is
``(ε, δ)``-DP" (:func:`one_run_p_value`; the maximum is over ``i ≤ v``, since ``f(v - i) = 1``
beyond). The hypothesis is rejected at level ``1 - confidence`` when the p-value is below it,
and :func:`one_run_epsilon_from_counts` bisects for the largest ε it rejects.

Two remarks on validity:

* ``(ε, δ)``-DP implies ``(ε', δ)``-DP for every ``ε' ≥ ε``, so rejecting ``ε'`` rejects every
  smaller ε too: the reported bound is valid even where the p-value (with ``δ > 0``) is not
  monotone in ε — bisection then finds *a* rejected ``ε'``, perhaps not the largest
  (conservative, never optimistic). It returns the rejected end of its final bracket.
* The ``k``'s must be fixed before looking at the scores. :func:`best_lower_bound` chooses them
  after looking, so it pays a union bound over the grid it tries: every candidate is tested at
  level ``(1 - confidence) / len(grid)``.

The ε bounded is the one for neighbouring datasets that differ by *adding or removing* one
canary (the relation of shoal's Poisson-sampled accounting, :mod:`shoal.privacy.accounting`),
and ``m`` is the number of canaries audited, abstentions included (it enters through ``δ``).
The bound is on the privacy of the canaries as the training treats them: with DP-SGD
(:mod:`shoal.privacy.dpsgd`) each canary is one training example.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "OneRunBound",
    "best_lower_bound",
    "canary_mask",
    "default_grid",
    "one_run_epsilon_from_counts",
    "one_run_epsilon_lower_bound",
    "one_run_guesses",
    "one_run_p_value",
]

_EPS_MAX = 2.0 ** 10
"""No search goes above this ε (at ``r ≤ 10^6`` every p-value is 1 long before)."""
_TOL = 1e-9


class OneRunBound(NamedTuple):
    """The result of :func:`best_lower_bound`: the bound ``epsilon`` reached with ``k_plus``
    positive and ``k_minus`` negative guesses, of which ``v`` of ``r`` were correct, each
    candidate tested at confidence ``confidence`` (the union-bound-adjusted one) over
    ``grid_size`` candidates."""

    epsilon: float
    k_plus: int
    k_minus: int
    r: int
    v: int
    confidence: float
    grid_size: int


def canary_mask(m: int, seed: int) -> Tensor:
    """Which of ``m`` canaries to include in training: ``m`` independent fair coins (a bool
    tensor, a pure function of ``seed``). The theorem needs exactly this: each canary in with
    probability 1/2, independently of everything else, and unknown to the auditor's guesses."""
    if m < 0:
        raise ValueError(f"canary_mask: m must be >= 0 (got {m}).")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (m,), generator=gen).bool()


def _vector(x: Any, what: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional (got shape {a.shape}).")
    return a


def one_run_guesses(scores: Any, *, k_plus: int, k_minus: int) -> Tensor:
    """The auditor's guesses, an int8 tensor in ``{-1, 0, +1}``: ``+1`` ("included") for the
    ``k_plus`` highest scores, ``-1`` ("excluded") for the ``k_minus`` lowest, ``0`` (abstain)
    for the rest. Ties are broken by position (a stable sort), which is independent of the
    inclusion coins."""
    s = _vector(scores, "one_run_guesses: scores").astype(np.float64)
    m = len(s)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"one_run_guesses: need k_plus, k_minus >= 0 and k_plus + k_minus <= "
                         f"m = {m} (got {k_plus}, {k_minus}).")
    if np.isnan(s).any():
        raise ValueError("one_run_guesses: scores contain NaN.")
    order = np.argsort(-s, kind="stable")
    t = np.zeros(m, dtype=np.int8)
    t[order[:k_plus]] = 1
    t[order[m - k_minus:]] = -1
    return torch.from_numpy(t)


def _log_pmf(r: int, epsilon: float) -> np.ndarray:
    """``log P[Binomial(r, e^ε/(1+e^ε)) = k]`` for ``k = 0..r``, stably at any ε."""
    k = np.arange(r + 1, dtype=np.float64)
    log_binom = np.array([math.lgamma(r + 1) - math.lgamma(i + 1) - math.lgamma(r - i + 1)
                          for i in range(r + 1)])
    log_q = -float(np.logaddexp(0.0, -epsilon))       # log(e^ε / (1 + e^ε))
    log_1mq = -float(np.logaddexp(0.0, epsilon))      # log(1 / (1 + e^ε))
    return log_binom + k * log_q + (r - k) * log_1mq


def _check_counts(m: int, r: int, v: int, delta: float, what: str) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"{what}: need 0 <= v <= r <= m (got v={v}, r={r}, m={m}).")
    if not 0 <= delta <= 1:
        raise ValueError(f"{what}: delta must be in [0, 1] (got {delta}).")


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability bound of the paper's Theorem 3.1 for ``v`` or more correct guesses out
    of ``r`` among ``m`` canaries if the training is ``(ε, δ)``-DP:
    ``min(1, f(v) + 2mδ · max_{1 ≤ i ≤ v} (f(v-i) - f(v)) / i)`` with
    ``f(v) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v]`` (the paper's Algorithm 2, ``p_value_DP_audit``).
    A value below ``1 - confidence`` rejects "``(ε, δ)``-DP" at that confidence."""
    _check_counts(m, r, v, delta, "one_run_p_value")
    if epsilon < 0 or math.isnan(epsilon):
        raise ValueError(f"one_run_p_value: epsilon must be >= 0 (got {epsilon}).")
    pmf = np.exp(_log_pmf(r, epsilon))
    beta = float(pmf[v:].sum())                        # f(v) = P[W' >= v]
    alpha = 0.0
    if delta > 0 and v > 0:
        below = np.cumsum(pmf[v - 1::-1])              # i -> P[v - i <= W' < v], i = 1..v
        alpha = float((below / np.arange(1, v + 1)).max())
    return float(min(1.0, beta + 2 * m * delta * alpha))


def one_run_epsilon_from_counts(*, m: int, r: int, v: int, delta: float,
                                confidence: float = 0.95) -> float:
    """The largest ε (to ``1e-9``) whose ``(ε, δ)``-DP hypothesis :func:`one_run_p_value`
    rejects at ``confidence`` after ``v`` of ``r`` guesses were correct among ``m`` canaries:
    a lower bound on the training's ε that holds with probability ``confidence``. 0 when not
    even ``ε = 0`` is rejected. Bisection as in the paper's ``get_eps_audit``; the rejected end
    of the final bracket is returned."""
    _check_counts(m, r, v, delta, "one_run_epsilon_from_counts")
    if not 0 < confidence < 1:
        raise ValueError(f"one_run_epsilon_from_counts: confidence must be in (0, 1) "
                         f"(got {confidence}).")
    p = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) < p

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > _EPS_MAX:
            return lo
    while hi - lo > _TOL * max(1.0, hi):
        mid = (lo + hi) / 2
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _counts(scores: Any, included: Any, k_plus: int, k_minus: int) -> tuple[int, int, int]:
    t = one_run_guesses(scores, k_plus=k_plus, k_minus=k_minus).numpy()
    inc = _vector(included, "included").astype(bool)
    if len(inc) != len(t):
        raise ValueError(f"scores and included differ in length ({len(t)} != {len(inc)}).")
    s = np.where(inc, 1, -1)
    return len(t), int(np.abs(t).sum()), int((t * s > 0).sum())


def one_run_epsilon_lower_bound(scores: Any, included: Any, *, k_plus: int, k_minus: int,
                                delta: float, confidence: float = 0.95) -> float:
    """A lower bound on ε, with probability ``confidence``, from one training run in which
    each of ``m = len(scores)`` canaries was included independently with probability 1/2
    (``included``: the truth, e.g. :func:`canary_mask`; ``scores``: higher = more likely
    included). Guesses "included" for the ``k_plus`` highest scores and "excluded" for the
    ``k_minus`` lowest (:func:`one_run_guesses`), counts the ``v`` correct of ``r`` and returns
    :func:`one_run_epsilon_from_counts`. ``k_plus`` and ``k_minus`` must be chosen before the
    scores are seen (else see :func:`best_lower_bound`)."""
    m, r, v = _counts(scores, included, k_plus, k_minus)
    return one_run_epsilon_from_counts(m=m, r=r, v=v, delta=delta, confidence=confidence)


def default_grid(m: int) -> list[tuple[int, int]]:
    """The ``(k_plus, k_minus)`` pairs :func:`best_lower_bound` tries by default: each of
    ``0, 1, 2, 4, ...`` (powers of two below ``m``) and ``m``, paired, with
    ``0 < k_plus + k_minus ≤ m``."""
    ks = [0] + [2 ** j for j in range(max(0, m).bit_length()) if 2 ** j < m] + [m]
    ks = sorted(set(ks))
    return [(a, b) for a in ks for b in ks if 0 < a + b <= m]


def best_lower_bound(scores: Any, included: Any, delta: float, confidence: float = 0.95, *,
                     grid: Iterable[tuple[int, int]] | None = None) -> OneRunBound:
    """The best :func:`one_run_epsilon_lower_bound` over a grid of ``(k_plus, k_minus)``
    (:func:`default_grid` unless given), with the bound still holding with probability
    ``confidence``: choosing the ``k``'s after looking at the scores is a multiple test, so
    each candidate is tested at level ``(1 - confidence) / len(grid)`` (a union bound over the
    grid). A small grid chosen in advance loses less to the union bound than a large one."""
    s = _vector(scores, "best_lower_bound: scores")
    pairs: Sequence[tuple[int, int]] = list(default_grid(len(s)) if grid is None else grid)
    if not pairs:
        raise ValueError("best_lower_bound: the grid is empty.")
    if not 0 < confidence < 1:
        raise ValueError(f"best_lower_bound: confidence must be in (0, 1) (got {confidence}).")
    adjusted = 1.0 - (1.0 - confidence) / len(pairs)
    best: OneRunBound | None = None
    for k_plus, k_minus in pairs:
        m, r, v = _counts(s, included, k_plus, k_minus)
        eps = one_run_epsilon_from_counts(m=m, r=r, v=v, delta=delta, confidence=adjusted)
        if best is None or eps > best.epsilon:
            best = OneRunBound(eps, k_plus, k_minus, r, v, adjusted, len(pairs))
    assert best is not None
    return best
