"""Distributed DP: the distributed discrete Gaussian (Kairouz, Liu & Steinke 2021) over secure
aggregation, so that no one — not the coordinator either — ever sees an un-noised sum.

Central DP-FedAvg trusts the coordinator: it adds the noise to the exact sum of the clipped
updates, which it sees (with secure aggregation too). Here every client adds its *share* of the
noise before its update is masked, so the secure sum the coordinator unmasks already carries
the noise of every contributor. Per client (:meth:`DistributedDP.encode`):

1. **clip** the update to L2 norm C;
2. **scale** it by 1/γ (γ, the granularity, is one step of the integer grid);
3. **conditional randomized rounding**: round every coordinate up with probability equal to
   its fractional part (unbiased), and draw again until the rounded vector's norm is at most
   Δ₂ = min(C/γ + √d, (C²/γ² + d/4 + √(2 log 1/β) (C/γ + √d/2))^½) — so the sensitivity
   the accountant uses holds for every vector sent (a redraw happens with probability ≤ β);
4. **discrete Gaussian noise** N_Z(0, σ_loc²) on every coordinate, σ_loc² = (zC/γ)² / n_min,
   drawn from a secret keystream (:mod:`shoal.privacy.secure_random`): rejection sampling from
   discrete Laplace draws (Canonne, Kamath & Steinke 2020, Algorithm 3), whose acceptance test
   is computed in floating point (an approximation of their exact arithmetic);
5. **modular clipping**: the integers are taken modulo 2^32, the ring of secure aggregation.

The coordinator reads the unmasked sum modulo 2^32 as signed integers and multiplies by γ: the
sum of the contributors' clipped updates plus the sum of their noise, standard deviation
z·C·√(m / n_min) per coordinate for m ≥ n_min contributors. A round with fewer than n_min
contributors fails (no sum is released): every released sum carries the noise of n_min clients.

The ring: γ is chosen so that even the worst case — every one of ``max_clients`` contributors
putting its whole norm C on one coordinate — plus ``tail`` standard deviations of the noise
fits in [−2^31, 2^31), so the sum wraps only through the noise's far tail (probability about
10^-12 per coordinate at ``tail = 7``). With a 32-bit ring this leaves γ so fine (C/γ ≈ 10^6
and more) that rounding inflates Δ₂ by a negligible fraction; the paper's random rotation,
which flattens a vector so that fewer bits suffice, is not needed and not applied.

Accounting (:meth:`DistributedDP.events`), Kairouz et al., Theorem 1 / Proposition 14: the sum
of n_min discrete Gaussians of variance σ_loc² satisfies, against any change Δ of one client's
rounded vector with ‖Δ‖₂ ≤ Δ₂ and ‖Δ‖₁ ≤ Δ₁ = Δ₂·min(√d, Δ₂), Rényi DP of order α

    min( α/2 · s² + τ d,   α/2 · (s² + 2 s₁ τ + τ² d),   α/2 · (s + √d τ)² )

with s = Δ₂ / (√n_min σ_loc), s₁ = Δ₁ / (√n_min σ_loc) and
τ = 10 Σ_{k=1}^{n_min−1} exp(−2π² σ_loc² k/(k+1)). Each of the three is a (ξ, ρ)-zCDP bound —
dp-accounting's ``ZCDpEvent`` — so a round is accounted as the best of three such events,
composed over the rounds by dp-accounting's RDP accountant and converted to (ε, δ) there. The
adjacency is *replace one client's update by zeros* (``REPLACE_SPECIAL``): the client still adds
its noise share, as the theorem assumes. No amplification by sampling is claimed: the
coordinator, whom this mode protects against, chooses the cohort and knows who is in it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import rdp

from ..aggregate.reducers import WeightedMean
from ..aggregate.stages import Stage, StageState
from ..errors import AggregationError, ConfigError
from ..secagg.quantize import RING_BITS
from ..tree import Params
from ..types import ClientInfo, RoundInfo
from .secure_random import SecureGenerator, privacy_generator

__all__ = ["DistributedDP", "calibrate_distributed", "discrete_gaussian", "distributed_dp",
           "distributed_epsilon"]

_HALF = 2 ** (RING_BITS - 1)
_ZERO_OUT = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
"""Neighbouring runs differ in one client's update replaced by zeros."""
_MAX_REDRAWS = 1000


def discrete_gaussian(n: int, sigma: float, gen: SecureGenerator) -> np.ndarray:
    """``n`` draws of the discrete Gaussian N_Z(0, sigma²) as int64, by rejection from the
    discrete Laplace of scale t = ⌊sigma⌋ + 1 (a difference of two geometric draws), accepted
    with probability exp(−(|y| − sigma²/t)² / (2 sigma²)) (Canonne, Kamath & Steinke 2020,
    Algorithm 3, vectorized; the acceptance test in floating point). Uniforms from ``gen``."""
    if not sigma > 0:
        raise ValueError(f"discrete_gaussian: sigma must be > 0 (got {sigma}).")
    t = math.floor(sigma) + 1
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        want = n - filled
        m = int(want * 1.4) + 64  # the acceptance rate is above 0.7 for every sigma >= 1
        g = np.floor(-t * np.log(gen.random(2 * m).numpy()))
        y = g[:m] - g[m:]
        keep = gen.random(m).numpy() < np.exp(-np.square(np.abs(y) - sigma * sigma / t)
                                               / (2 * sigma * sigma))
        got = y[keep][:want]
        out[filled:filled + got.shape[0]] = got
        filled += got.shape[0]
    return out


class DistributedDP(Stage):
    """The distributed discrete Gaussian over secure aggregation; see the module docstring.

    Args:
        noise_multiplier: z: the noise in every released sum has standard deviation at least
            z·C per coordinate (the noise of ``min_clients`` clients).
        clip_norm: C, the L2 bound on one client's update.
        dim: d, the number of values in an update (the accounting depends on it).
        min_clients: n_min, the fewest contributors a round releases a sum of; each client adds
            1/n_min of the noise variance, and a round with fewer contributors fails.
        max_clients: the most contributors a round can have (sizes the integer grid).
        beta: the conditional rounding's bound on the probability of a redraw (the paper's
            e^-1/2 by default).
        tail: how many noise standard deviations the ring must hold beyond the worst-case sum.
        reproducible: draw the rounding and the noise from the run's seed instead of a secret
            keystream (research reruns only: everyone holding the config can subtract it).
    """

    runs_at = "client"
    protects_updates = True
    encodes_to_ring = True
    """The per-update half's output is encoded by :meth:`encode` into integers modulo 2^32
    and decoded by :meth:`decode` from their secure sum (see :class:`shoal.secagg.SecureFedAvg`);
    it works only inside secure aggregation."""

    def __init__(self, noise_multiplier: float, clip_norm: float, dim: int, min_clients: int,
                 max_clients: int, *, beta: float = math.exp(-0.5), tail: float = 7.0,
                 reproducible: bool = False):
        if not noise_multiplier > 0:
            raise ConfigError(f"distributed_dp: noise_multiplier must be > 0 "
                              f"(got {noise_multiplier}).")
        if not clip_norm > 0:
            raise ConfigError(f"distributed_dp: clip_norm must be > 0 (got {clip_norm}).")
        if dim < 1:
            raise ConfigError(f"distributed_dp: dim must be >= 1 (got {dim}).")
        if min_clients < 2:
            raise ConfigError(
                f"distributed_dp: min_clients must be >= 2 (got {min_clients}): the noise of a "
                "single client is its own, and secure aggregation needs two inputs to hide one.")
        if max_clients < min_clients:
            raise ConfigError(f"distributed_dp: max_clients ({max_clients}) must be >= "
                              f"min_clients ({min_clients}).")
        if not 0 < beta < 1:
            raise ConfigError(f"distributed_dp: beta must be in (0, 1) (got {beta}).")
        if not tail > 0:
            raise ConfigError(f"distributed_dp: tail must be > 0 (got {tail}).")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.dim = int(dim)
        self.min_clients = int(min_clients)
        self.max_clients = int(max_clients)
        self.beta = float(beta)
        self.tail = float(tail)
        self.reproducible = reproducible
        spread = self.total_std * math.sqrt(self.max_clients / self.min_clients)
        self.granularity = ((self.max_clients * self.clip_norm + self.tail * spread)
                            / (_HALF - self.max_clients - 1))
        """γ: one step of the integer grid (see the module docstring)."""
        if self.local_std < 0.5:
            raise ConfigError(
                f"distributed_dp: each client's noise would be {self.local_std:.3g} grid steps, "
                "below the 1/2 the accounting theorem needs; raise noise_multiplier or lower "
                "max_clients.")

    def __repr__(self) -> str:
        extra = ", reproducible=True" if self.reproducible else ""
        return (f"distributed_dp(noise_multiplier={self.noise_multiplier:g}, "
                f"clip_norm={self.clip_norm:g}, dim={self.dim}, min_clients={self.min_clients}, "
                f"max_clients={self.max_clients}{extra})")

    # -- the mechanism's constants ------------------------------------------------------------

    @property
    def total_std(self) -> float:
        """z·C: the noise's standard deviation per coordinate with ``min_clients`` shares."""
        return self.noise_multiplier * self.clip_norm

    @property
    def local_std(self) -> float:
        """σ_loc, one client's discrete Gaussian noise in grid steps."""
        return self.total_std / (self.granularity * math.sqrt(self.min_clients))

    @property
    def l2_bound(self) -> float:
        """Δ₂, in grid steps: the norm every rounded vector keeps (conditional rounding)."""
        c, d = self.clip_norm / self.granularity, self.dim
        squared = c * c + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (c + math.sqrt(d) / 2)
        return min(c + math.sqrt(d), math.sqrt(squared))

    def tau(self) -> float:
        """τ = 10 Σ_{k=1}^{n_min−1} exp(−2π² σ_loc² k/(k+1)), the price of summing discrete
        Gaussians (0 in double precision once σ_loc exceeds about 6)."""
        k = np.arange(1, self.min_clients, dtype=np.float64)
        return float(10 * np.exp(-2 * math.pi ** 2 * self.local_std ** 2 * k / (k + 1)).sum())

    # -- accounting ---------------------------------------------------------------------------

    def events(self) -> list[dp_accounting.ZCDpEvent]:
        """One round as three (ξ, ρ)-zCDP events, each a valid bound (the module docstring's
        three terms); the run's ε is the smallest of theirs."""
        d, tau = self.dim, self.tau()
        scale = math.sqrt(self.min_clients) * self.local_std
        s = self.l2_bound / scale
        s1 = self.l2_bound * min(math.sqrt(d), self.l2_bound) / scale
        return [dp_accounting.ZCDpEvent(rho=s * s / 2, xi=tau * d),
                dp_accounting.ZCDpEvent(rho=(s * s + 2 * s1 * tau + tau * tau * d) / 2),
                dp_accounting.ZCDpEvent(rho=(s + math.sqrt(d) * tau) ** 2 / 2)]

    def epsilon(self, rounds: int, delta: float) -> float:
        """ε at ``delta`` after ``rounds`` released sums (dp-accounting's RDP accountant)."""
        if rounds <= 0:
            return 0.0
        return min(distributed_epsilon(e, rounds, delta) for e in self.events())

    # -- the stage ----------------------------------------------------------------------------

    def check_reducer(self, reducer: Any) -> None:
        """Refuse any reducer but the uniform mean: a client's weight must not scale its
        influence beyond C."""
        if not (isinstance(reducer, WeightedMean) and reducer.weighting == "uniform"):
            raise AggregationError(
                f"{self!r} needs the uniform mean, weighted_mean('uniform'): its noise is "
                f"calibrated to one client's clipped update, but {reducer!r} lets a client's "
                "weight scale its influence; use weighted_mean('uniform').")

    def client(self, update: Params, config: Mapping[str, Any], info: ClientInfo) -> Params:
        """The identity inside a secure-aggregation session (clipping, rounding and noise
        happen in :meth:`encode`); outside one it refuses, so an update is never sent
        without its noise."""
        if info.config.get("secagg") is not True:
            raise AggregationError(
                f"{self!r} ran outside a secure-aggregation session: the update would leave "
                "the client without its noise. Use shoal.secagg.SecureFedAvg with this stage.")
        return update

    def generator(self, seed: int, round: int, client: str) -> SecureGenerator:
        """The generator of one client's rounding and noise in one round: a secret keystream
        (or, with ``reproducible``, one keyed by the run's seed)."""
        return privacy_generator(self.reproducible, seed, "distributed-dp", round, client)

    def rounded(self, update: np.ndarray, gen: SecureGenerator) -> np.ndarray:
        """Steps 1-3: ``update`` (``dim`` float values) clipped to C, scaled by 1/γ and rounded
        to integers (int64) whose norm is at most :attr:`l2_bound` (redrawn until it is)."""
        x = np.asarray(update, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise AggregationError(f"{self!r}: the update has {x.shape[0]} values, but the "
                                   f"noise was calibrated for {self.dim}.")
        if not np.isfinite(x).all():
            raise AggregationError(f"{self!r}: the update holds NaN or infinite values.")
        norm = float(np.linalg.norm(x))
        z = x * (min(1.0, self.clip_norm / norm) / self.granularity if norm > 0 else 0.0)
        floor = np.floor(z)
        frac = z - floor
        bound = self.l2_bound ** 2
        for _ in range(_MAX_REDRAWS):
            out = floor + (gen.random(self.dim).numpy() < frac)
            if float(np.dot(out, out)) <= bound:
                return out.astype(np.int64)
        raise AggregationError(  # probability beta ** _MAX_REDRAWS
            f"{self!r}: conditional rounding failed {_MAX_REDRAWS} times.")

    def encode(self, update: np.ndarray, gen: SecureGenerator) -> np.ndarray:
        """One client's update (``dim`` float values) clipped, scaled, rounded
        (:meth:`rounded`), noised and taken modulo 2^32 (``uint32``); see the module docstring.
        ``gen``: from :meth:`generator`."""
        noisy = self.rounded(update, gen) + discrete_gaussian(self.dim, self.local_std, gen)
        return noisy.astype(np.uint32)  # two's complement: modulo 2^32

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The noisy sum (float64) from the secure sum of the encoded updates modulo 2^32."""
        return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) \
            * self.granularity

    def server(self, aggregate: Params, state: StageState,
               info: RoundInfo) -> tuple[Params, StageState, dict[str, float]]:
        """The aggregate as it is (it carries the noise already); its noise level in metrics."""
        m = max(info.replied, 1)
        std = self.total_std * math.sqrt(m / self.min_clients) / m
        return aggregate, state, {"dp/clip_norm": self.clip_norm, "dp/noise_std": std}


def distributed_epsilon(event: dp_accounting.ZCDpEvent, rounds: int, delta: float) -> float:
    """ε at ``delta`` of ``rounds`` compositions of ``event`` (RDP accountant, the zero-out
    adjacency)."""
    acc = rdp.RdpAccountant(neighboring_relation=_ZERO_OUT)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(delta))


def calibrate_distributed(target_epsilon: float, delta: float, rounds: int, clip_norm: float,
                          dim: int, min_clients: int, max_clients: int,
                          tol: float = 1e-4) -> float:
    """The smallest noise multiplier whose ``rounds`` released sums spend at most
    ``target_epsilon`` at ``delta`` (dp-accounting's ``calibrate_dp_mechanism`` over the
    tightest of the round's events, to within ``tol`` in the multiplier)."""
    if not target_epsilon > 0:
        raise ConfigError(f"calibrate_distributed: target_epsilon must be > 0 "
                          f"(got {target_epsilon}).")
    if rounds < 1:
        raise ConfigError(f"calibrate_distributed: rounds must be >= 1 (got {rounds}).")

    def event(z: float) -> dp_accounting.DpEvent:
        stage = DistributedDP(z, clip_norm, dim, min_clients, max_clients)
        best = min(stage.events(), key=lambda e: distributed_epsilon(e, rounds, delta))
        return dp_accounting.SelfComposedDpEvent(best, rounds)

    def accountant() -> rdp.RdpAccountant:
        return rdp.RdpAccountant(neighboring_relation=_ZERO_OUT)

    return float(dp_accounting.calibrate_dp_mechanism(
        accountant, event, target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.1, 1.0), tol=tol))


def distributed_dp(noise_multiplier: float, clip_norm: float, dim: int, min_clients: int,
                   max_clients: int, *, beta: float = math.exp(-0.5), tail: float = 7.0,
                   reproducible: bool = False) -> DistributedDP:
    """The distributed-DP stage; see :class:`DistributedDP`. Use it inside
    :class:`~shoal.secagg.SecureFedAvg` with ``weighted_mean("uniform")``."""
    return DistributedDP(noise_multiplier, clip_norm, dim, min_clients, max_clients, beta=beta,
                         tail=tail, reproducible=reproducible)
