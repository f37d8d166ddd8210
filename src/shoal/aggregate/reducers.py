"""Reducers: many updates -> one.

A reducer says whether it is *linear* (sum-decomposable): a linear reducer can be computed from
running sums, so an executor may stream updates into it and secure aggregation (which reveals
only sums) can feed it. The robust reducers (median, trimmed mean, Krum) are not linear: they
need the individual updates and ignore the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .. import tree
from ..errors import AggregationError, ConfigError
from ..tree import Params

__all__ = [
    "CoordinateMedian",
    "GeometricMedian",
    "TrustedMean",
    "Krum",
    "Reducer",
    "TrimmedMean",
    "WeightedMean",
    "coordinate_median",
    "geometric_median",
    "trusted_mean",
    "krum",
    "multi_krum",
    "trimmed_mean",
    "weighted_mean",
]


class Reducer:
    """Base class: ``reducer(updates, weights) -> update``.

    ``linear`` says whether the result is a function of ``sum(w_i * x_i)`` and ``sum(w_i)``
    only, where ``w_i = client_weight(weight_i)``; a linear reducer computes it with
    :meth:`finalize`, so a :class:`~shoal.aggregate.Fold` keeps only running sums.
    ``min_updates`` is the fewest updates it can reduce.
    """

    linear: bool = False
    min_updates: int = 1

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        raise NotImplementedError

    def client_weight(self, weight: float) -> float:
        """The weight this reducer gives an update whose client reported ``weight``."""
        return weight

    def finalize(self, weighted_sum: Params, total_weight: float) -> Params:
        """The result from running sums (linear reducers only)."""
        raise AggregationError(f"{self!r} is not linear: it needs the individual updates, not "
                               "their sum.")

    def _check(self, updates: Sequence[Params], weights: Sequence[float]) -> None:
        if len(updates) != len(weights):
            raise AggregationError(
                f"{self!r}: got {len(updates)} updates but {len(weights)} weights."
            )
        if len(updates) < self.min_updates:
            raise AggregationError(
                f"{self!r} needs at least {self.min_updates} updates, got {len(updates)}; "
                "sample more clients per round or raise min_replies."
            )


class WeightedMean(Reducer):
    """``sum(w_i * x_i) / sum(w_i)``: FedAvg's average.

    ``weighting="examples"`` uses the clients' weights (their numbers of examples, McMahan et
    al. 2017); ``"uniform"`` gives every client the same weight.
    """

    linear = True

    def __init__(self, weighting: Literal["examples", "uniform"] = "examples"):
        if weighting not in ("examples", "uniform"):
            raise ConfigError(
                f"weighted_mean: weighting must be 'examples' or 'uniform' (got {weighting!r})."
            )
        self.weighting = weighting

    def __repr__(self) -> str:
        return "weighted_mean()" if self.weighting == "examples" else "weighted_mean('uniform')"

    def client_weight(self, weight: float) -> float:
        """The weight this reducer gives an update whose client reported ``weight``."""
        return weight if self.weighting == "examples" else 1.0

    def finalize(self, weighted_sum: Params, total_weight: float) -> Params:
        """The mean from running sums: ``weighted_sum / total_weight``."""
        if not total_weight > 0:
            raise AggregationError(
                f"{self!r}: the total weight is {total_weight}; expected > 0 "
                "(every update came from a client with no examples)."
            )
        return {k: v / total_weight for k, v in weighted_sum.items()}

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        self._check(updates, weights)
        from .fold import Fold  # the running sum is the fold's

        fold = Fold(self, updates[0])
        for u, w in zip(updates, weights, strict=True):
            fold.add(u, w)
        result, _ = fold.finish()
        assert result is not None
        return result


def weighted_mean(weighting: Literal["examples", "uniform"] = "examples") -> WeightedMean:
    """FedAvg's average, weighted by examples (default) or uniform; see :class:`WeightedMean`."""
    return WeightedMean(weighting)


def _stacked(updates: Sequence[Params], name: str) -> Tensor:
    return torch.stack([u[name] for u in updates])  # (n, *shape)


class CoordinateMedian(Reducer):
    """The coordinate-wise median (Yin et al. 2018); the mean of the two middle values when the
    number of updates is even. Ignores weights."""

    def __repr__(self) -> str:
        return "coordinate_median()"

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        self._check(updates, weights)
        n = len(updates)
        out: Params = {}
        for name in updates[0]:
            s = _stacked(updates, name).sort(dim=0).values
            out[name] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        return out


def coordinate_median() -> CoordinateMedian:
    """The coordinate-wise median; see :class:`CoordinateMedian`."""
    return CoordinateMedian()


class TrimmedMean(Reducer):
    """The coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the
    ``floor(beta * n)`` largest and smallest values and average the rest. Ignores weights;
    ``trimmed_mean(0)`` is the plain mean."""

    def __init__(self, beta: float):
        if not 0 <= beta < 0.5:
            raise ConfigError(f"trimmed_mean: beta must be in [0, 0.5) (got {beta}).")
        self.beta = float(beta)

    def __repr__(self) -> str:
        return f"trimmed_mean({self.beta:g})"

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        self._check(updates, weights)
        n = len(updates)
        k = math.floor(self.beta * n)
        out: Params = {}
        for name in updates[0]:
            s = _stacked(updates, name).sort(dim=0).values
            out[name] = s[k:n - k].mean(dim=0)
        return out


def trimmed_mean(beta: float) -> TrimmedMean:
    """The coordinate-wise ``beta``-trimmed mean; see :class:`TrimmedMean`."""
    return TrimmedMean(beta)


class GeometricMedian(Reducer):
    """The weighted geometric median of the updates (RFA, Pillutla et al. 2022): the point
    minimising ``sum_i w_i * ||z - x_i||``, found by the smoothed Weiszfeld algorithm —
    ``z <- sum_i b_i x_i / sum_i b_i`` with ``b_i = w_i / max(eps, ||z - x_i||)`` — from the
    weighted mean, for at most ``max_iter`` steps or until ``z`` moves less than ``tol``
    (relative). Robust to fewer than half of the total weight being arbitrary. Computed in
    float64 on the flattened updates, in the order given, so the same inputs in the same order
    give the same bits."""

    def __init__(self, max_iter: int = 100, eps: float = 1e-8, tol: float = 1e-7):
        if max_iter < 1:
            raise ConfigError(f"geometric_median: max_iter must be >= 1 (got {max_iter}).")
        if not eps > 0 or not tol > 0:
            raise ConfigError(f"geometric_median: eps and tol must be > 0 (got {eps}, {tol}).")
        self.max_iter, self.eps, self.tol = int(max_iter), float(eps), float(tol)

    def __repr__(self) -> str:
        return "geometric_median()"

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        self._check(updates, weights)
        flat = torch.stack([tree.flatten(u)[0].double() for u in updates])  # (n, d)
        w = torch.tensor([float(x) for x in weights], dtype=torch.float64)  # (n,)
        if not bool((w > 0).all()):
            raise AggregationError(f"geometric_median: every weight must be > 0 (got "
                                   f"{[float(x) for x in weights]}).")
        z = (w[:, None] * flat).sum(0) / w.sum()  # (d,)
        for _ in range(self.max_iter):
            b = w / (flat - z).norm(dim=1).clamp_min(self.eps)
            nxt = (b[:, None] * flat).sum(0) / b.sum()
            moved = float((nxt - z).norm()) <= self.tol * max(1.0, float(z.norm()))
            z = nxt
            if moved:
                break
        _, spec = tree.flatten(updates[0])
        out = tree.unflatten(z, spec)
        return {k: v.to(updates[0][k].dtype) for k, v in out.items()}


def geometric_median(max_iter: int = 100) -> GeometricMedian:
    """The weighted geometric median (smoothed Weiszfeld); see :class:`GeometricMedian`."""
    return GeometricMedian(max_iter)


class TrustedMean(Reducer):
    """FLTrust's aggregation (Cao et al. 2021): each update is scored by its direction's
    agreement with a ``reference`` update the coordinator computed itself on a small clean root
    data set — trust ``ReLU(cos(update, reference))`` — rescaled to the reference's norm, and
    the trust-weighted mean is returned (the zero update when no update is trusted). Ignores
    the clients' weights; :attr:`last_trust` keeps the round's trust scores (the coordinator's
    per-client anomaly scores: 0 is an update pointing away from the reference)."""

    def __init__(self, reference: Params):
        self.reference = reference
        self.last_trust: list[float] = []

    def __repr__(self) -> str:
        return "trusted_mean(reference)"

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        self._check(updates, weights)
        ref, spec = tree.flatten(self.reference)
        ref = ref.double()
        ref_norm = float(ref.norm())
        flat = torch.stack([tree.flatten(u)[0].double() for u in updates])  # (n, d)
        norms = flat.norm(dim=1).clamp_min(1e-12)  # (n,)
        trust = torch.relu(flat @ ref / (norms * max(ref_norm, 1e-12)))  # (n,)
        self.last_trust = [float(t) for t in trust]
        if float(trust.sum()) == 0.0:
            z = torch.zeros_like(ref)
        else:
            z = (trust[:, None] * flat * (ref_norm / norms)[:, None]).sum(0) / trust.sum()
        out = tree.unflatten(z, spec)
        return {k: v.to(updates[0][k].dtype) for k, v in out.items()}


def trusted_mean(reference: Params) -> TrustedMean:
    """FLTrust's trust-weighted mean against ``reference``; see :class:`TrustedMean`."""
    return TrustedMean(reference)


class Krum(Reducer):
    """Krum and Multi-Krum (Blanchard et al. 2017), tolerating ``f`` Byzantine clients.

    Each update is scored by the sum of squared distances to its ``n - f - 2`` nearest
    neighbours; Krum returns the update with the lowest score, Multi-Krum the mean of the ``m``
    lowest-scored updates. Needs ``n >= 2f + 3`` and ``n >= m + f`` updates. Ignores weights;
    ties in score are broken by position.
    """

    def __init__(self, f: int, m: int = 1):
        if f < 0:
            raise ConfigError(f"krum: f (Byzantine clients tolerated) must be >= 0 (got {f}).")
        if m < 1:
            raise ConfigError(f"multi_krum: m (updates averaged) must be >= 1 (got {m}).")
        self.f = int(f)
        self.m = int(m)
        self.min_updates = max(2 * self.f + 3, self.m + self.f)

    def __repr__(self) -> str:
        return f"krum(f={self.f})" if self.m == 1 else f"multi_krum(f={self.f}, m={self.m})"

    def scores(self, updates: Sequence[Params]) -> Tensor:
        """Krum's score of each update (lower is more central), shape ``(n,)``."""
        n = len(updates)
        flat = torch.stack([tree.flatten(u)[0].double() for u in updates])  # (n, d)
        # The direct formula (not the matrix-product shortcut cdist uses above 25 rows) keeps
        # distances exact enough that scores do not depend on the order of the updates.
        d2 = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").pow(2)  # (n, n)
        d2.fill_diagonal_(float("inf"))
        nearest = d2.topk(n - self.f - 2, dim=1, largest=False).values  # (n, n - f - 2)
        return nearest.sum(dim=1)

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        self._check(updates, weights)
        chosen = self.scores(updates).argsort(stable=True)[:self.m].tolist()
        picked = [updates[i] for i in chosen]
        return tree.scale(tree.weighted_sum(picked, [1.0] * len(picked)), 1.0 / len(picked))


def krum(f: int) -> Krum:
    """Krum tolerating ``f`` Byzantine clients; see :class:`Krum`."""
    return Krum(f, 1)


def multi_krum(f: int, m: int) -> Krum:
    """Multi-Krum: the mean of the ``m`` most central updates; see :class:`Krum`."""
    return Krum(f, m)
