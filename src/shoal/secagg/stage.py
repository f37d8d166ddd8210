"""``SecureAggregation``: the pipeline stage that says "the coordinator sees only sums".

It carries the secure-aggregation settings and sets ``hides_individual_updates``, so the
:class:`~shoal.aggregate.Pipeline`'s secrecy check refuses, at construction, any reducer that
needs individual updates (median, trimmed mean, Krum) and any coordinator-side per-update stage.
Its per-update half does nothing to the update (encoding and masking are the protocol's); it
refuses to run outside a secure-aggregation session, so a pipeline holding it can never send
updates in the clear through plain :class:`~shoal.algorithms.fedavg.FedAvg`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..aggregate.stages import Stage
from ..errors import AggregationError, ConfigError
from ..tree import Params
from ..types import ClientInfo
from .graph import check_threshold

__all__ = ["SecureAggregation", "secure_aggregation"]


class SecureAggregation(Stage):
    """Secure aggregation settings (see :mod:`shoal.secagg`).

    Args:
        clip: each coordinate of an update is clipped to ``[-clip, clip]`` before quantization.
        max_weight: the public bound on a client's weight (examples); a larger weight counts
            as ``max_weight``. Quantization precision is relative to it.
        neighbours: the degree k of the neighbour graph (``None``: ``3 * ceil(log2 n)``).
        threshold: the Shamir threshold as a fraction of k, above one half
            (t = ``max(k // 2 + 1, ceil(threshold * k))``; the default, 0.51, is the smallest
            majority).
        max_mse: secure federated evaluation of a regression task: the public bound on a
            client's mean squared error (and ``sqrt(max_mse)`` on its mean absolute error); a
            larger one counts as the bound, and the clients clipped are counted
            (``fed_eval/clipped``). Quantization precision is relative to it.
    """

    runs_at = "client"
    hides_individual_updates = True
    protects_updates = True

    def __init__(self, clip: float = 10.0, max_weight: float = 1000.0,
                 neighbours: int | None = None, threshold: float = 0.51,
                 max_mse: float = 1e4):
        if not clip > 0:
            raise ConfigError(f"secure_aggregation: clip must be > 0 (got {clip}).")
        if not max_weight > 0:
            raise ConfigError(f"secure_aggregation: max_weight must be > 0 (got {max_weight}).")
        if neighbours is not None and neighbours < 1:
            raise ConfigError(f"secure_aggregation: neighbours must be >= 1 or None for the "
                              f"default 3*ceil(log2 n) (got {neighbours}).")
        if not (math.isfinite(max_mse) and max_mse > 0):
            raise ConfigError(f"secure_aggregation: max_mse must be a finite number > 0 "
                              f"(got {max_mse}).")
        check_threshold(threshold)
        self.max_mse = float(max_mse)
        self.clip = float(clip)
        self.max_weight = float(max_weight)
        self.neighbours = neighbours
        self.threshold = float(threshold)

    def __repr__(self) -> str:
        return (f"secure_aggregation(clip={self.clip:g}, max_weight={self.max_weight:g}, "
                f"neighbours={self.neighbours}, threshold={self.threshold:g}, "
                f"max_mse={self.max_mse:g})")

    def client(self, update: Params, config: Mapping[str, object], info: ClientInfo) -> Params:
        """The identity, inside a secure-aggregation session only."""
        if info.config.get("secagg") is not True:
            raise AggregationError(
                f"{self!r} ran outside a secure-aggregation session: plain FedAvg would send "
                "this update in the clear. Use shoal.secagg.SecureFedAvg with this pipeline."
            )
        return update


def secure_aggregation(clip: float = 10.0, max_weight: float = 1000.0,
                       neighbours: int | None = None, threshold: float = 0.51,
                       max_mse: float = 1e4) -> SecureAggregation:
    """The secure-aggregation stage; see :class:`SecureAggregation`."""
    return SecureAggregation(clip, max_weight, neighbours, threshold, max_mse)
