"""User-level DP: DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping (Andrew et
al. 2021), as a pipeline stage.

    Pipeline([dp_fedavg(1.0, clip_norm=0.5, cohort=cohort(0.1, "poisson"))],
             weighted_mean("uniform"))

Client half: clip the update to L2 norm C (this round's clipping norm, sent by the server); with
adaptive clipping also report ``b - 1/2`` where ``b = 1[||Δ|| <= C]``, as one extra scalar
tensor (``"dp/below_clip"``) that is summed with the update (so it is aggregated securely when
secure aggregation is on).

Server half, on the uniform mean of the ``m`` replies: recover the sum (``mean * m``), add
Gaussian noise N(0, (z_Δ C)²) to every coordinate and divide by the *expected* cohort size
``q N`` (the fixed-denominator estimator: the denominator does not depend on who took part).
Adaptively, the noisy count ``sum(b - 1/2) + N(0, σ_b²)`` estimates the fraction ``b̄`` of
updates under C, and ``C <- C * exp(-η (b̄ - γ))`` moves C toward the ``γ`` quantile of the
norms. Releasing both is one Gaussian mechanism with noise multiplier z, where
``z_Δ = (z^-2 - (2 σ_b)^-2)^-1/2`` (Andrew et al. 2021, Thm. 1): the accountant sees z.

The reducer must be the uniform mean (``weighted_mean("uniform")``): weighting by examples
would let one client's weight, not just C, set its influence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import tree
from ..aggregate.reducers import WeightedMean
from ..aggregate.stages import Stage, StageState
from ..algorithms.cohort import Cohort
from ..errors import AggregationError, ConfigError
from ..tree import Params
from ..types import ClientInfo, RoundInfo
from .secure_random import privacy_generator

__all__ = ["BELOW_CLIP", "DPFedAvg", "dp_fedavg"]

BELOW_CLIP = "dp/below_clip"
"""The name of the extra scalar each client adds with adaptive clipping: ``b - 1/2``."""


class DPFedAvg(Stage):
    """Clip each client's update, add Gaussian noise to the aggregate; see the module doc.

    Args:
        noise_multiplier: z, the total noise multiplier the accountant uses.
        clip_norm: C (the initial C with adaptive clipping).
        cohort: the cohort sampling of the algorithm (its expected size is the denominator).
        adaptive: adapt C toward the ``target_quantile`` of update norms.
        target_quantile: γ; clip_lr: η (geometric step); count_stddev: σ_b (default: expected
            cohort size / 20, as Andrew et al. suggest).
        reproducible: draw each round's noise from the run's seed (so a rerun is bit-identical)
            instead of a secret keystream (:mod:`shoal.privacy.secure_random`, the default).
            Anyone who holds the config — every client — could then regenerate the noise and
            subtract it: for research runs only; ``shoal serve`` refuses it.
    """

    runs_at = "client"
    protects_updates = True

    def __init__(self, noise_multiplier: float, clip_norm: float, cohort: Cohort, *,
                 adaptive: bool = False, target_quantile: float = 0.5, clip_lr: float = 0.2,
                 count_stddev: float | None = None, reproducible: bool = False):
        if not noise_multiplier > 0:
            raise ConfigError(f"dp_fedavg: noise_multiplier must be > 0 (got {noise_multiplier}).")
        if not clip_norm > 0:
            raise ConfigError(f"dp_fedavg: clip_norm must be > 0 (got {clip_norm}).")
        if not 0 < target_quantile < 1:
            raise ConfigError(f"dp_fedavg: target_quantile must be in (0, 1) "
                              f"(got {target_quantile}).")
        if not clip_lr > 0:
            raise ConfigError(f"dp_fedavg: clip_lr must be > 0 (got {clip_lr}).")
        if count_stddev is not None and not count_stddev > 0:
            raise ConfigError(f"dp_fedavg: count_stddev must be > 0 (got {count_stddev}).")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.cohort = cohort
        self.adaptive = adaptive
        self.target_quantile = float(target_quantile)
        self.clip_lr = float(clip_lr)
        self.count_stddev = count_stddev
        self.reproducible = reproducible

    def __repr__(self) -> str:
        extra = (f", adaptive=True, target_quantile={self.target_quantile:g}"
                 if self.adaptive else "")
        extra += ", reproducible=True" if self.reproducible else ""
        return (f"dp_fedavg(noise_multiplier={self.noise_multiplier:g}, "
                f"clip_norm={self.clip_norm:g}, {self.cohort!r}{extra})")

    # -- noise calibration ------------------------------------------------------------------

    def expected_clients(self, population: int) -> float:
        """The denominator: the expected number of clients per round."""
        return max(self.cohort.expected_size(population), 1.0)

    def count_noise(self, population: int) -> float:
        """σ_b, the noise on the count of updates under the clipping norm."""
        if self.count_stddev is not None:
            return self.count_stddev
        return self.expected_clients(population) / 20

    def update_noise_multiplier(self, population: int) -> float:
        """z_Δ, the noise multiplier on the update sum (z itself with fixed clipping)."""
        z = self.noise_multiplier
        if not self.adaptive:
            return z
        sb = self.count_noise(population)
        if not 2 * sb > z:
            raise ConfigError(
                f"dp_fedavg: with adaptive clipping the count noise σ_b = {sb:g} must exceed "
                f"noise_multiplier / 2 = {z / 2:g}, or the update sum gets no privacy budget; "
                "raise count_stddev or sample more clients per round."
            )
        return (z ** -2 - (2 * sb) ** -2) ** -0.5

    # -- the two halves ---------------------------------------------------------------------

    def extra_tensors(self) -> Params:
        """The scalar this stage adds to each update (adaptive clipping only)."""
        return {BELOW_CLIP: torch.zeros(())} if self.adaptive else {}

    def check_reducer(self, reducer: Any) -> None:
        """Refuse any reducer but the uniform mean (see the module doc)."""
        if not (isinstance(reducer, WeightedMean) and reducer.weighting == "uniform"):
            raise AggregationError(
                f"{self!r} needs the uniform mean, weighted_mean('uniform'): its noise is "
                f"calibrated to one client's clipped update, but {reducer!r} lets a client's "
                "weight scale its influence; use weighted_mean('uniform')."
            )

    def init(self) -> StageState:
        """The clipping norm before round 1."""
        return {"clip_norm": self.clip_norm}

    def client_config(self, state: StageState) -> dict[str, Any]:
        """This round's clipping norm."""
        return {"clip_norm": float(state["clip_norm"])}

    def client(self, update: Params, config: Mapping[str, Any], info: ClientInfo) -> Params:
        """Clip to this round's C; with adaptive clipping add ``b - 1/2``."""
        c = float(config.get("clip_norm", self.clip_norm))
        norm = tree.norm(update)
        out = update if norm <= c else tree.scale(update, c / norm)
        if self.adaptive:
            out = {**out, BELOW_CLIP: torch.tensor(0.5 if norm <= c else -0.5)}
        return out

    def server(self, aggregate: Params, state: StageState,
               info: RoundInfo) -> tuple[Params, StageState, dict[str, float]]:
        """Noise the sum, divide by the expected cohort size, adapt C."""
        c = float(state["clip_norm"])
        m = info.replied
        expected = self.expected_clients(info.population)
        std = self.update_noise_multiplier(info.population) * c
        gen = privacy_generator(self.reproducible, info.seed, "dp-fedavg-noise", info.round)
        out: Params = {}
        for k, v in aggregate.items():  # v: the uniform mean of m updates
            if k == BELOW_CLIP:
                continue
            noisy = v * m + gen.normal(v.shape, std, v.dtype)
            out[k] = noisy / expected
        metrics = {"dp/clip_norm": c, "dp/noise_std": std / expected}
        new_state = dict(state)
        if self.adaptive:
            below = float(aggregate[BELOW_CLIP]) * m + float(
                gen.normal((1,), self.count_noise(info.population), torch.float64)[0])
            fraction = below / expected + 0.5  # sum(b - 1/2) / m' + 1/2 = b̄
            new_state["clip_norm"] = c * math.exp(-self.clip_lr * (fraction - self.target_quantile))
            metrics["dp/below_clip_fraction"] = fraction
        return out, new_state, metrics


def dp_fedavg(noise_multiplier: float, clip_norm: float, cohort: Cohort, *,
              adaptive: bool = False, target_quantile: float = 0.5, clip_lr: float = 0.2,
              count_stddev: float | None = None, reproducible: bool = False) -> DPFedAvg:
    """The DP-FedAvg stage; see :class:`DPFedAvg`. Pair it with ``weighted_mean("uniform")``."""
    return DPFedAvg(noise_multiplier, clip_norm, cohort, adaptive=adaptive,
                    target_quantile=target_quantile, clip_lr=clip_lr, count_stddev=count_stddev,
                    reproducible=reproducible)
