"""Stages: two-sided transforms of updates.

A stage has a *per-update* half, which runs on each client's update before reduction, and a
*server* half, which runs on the reduced update. In a pipeline the per-update halves run in
order and the server halves in reverse order (a stack), so an encoding stage can decode what
it encoded.

Where the per-update half runs is the stage's ``runs_at``: ``"client"`` (where the update is
made, trusting the client: DP clipping, quantisation, secure-aggregation encoding) or
``"coordinator"`` (on each received update, trusting nobody: norm bounding against poisoning).
A coordinator-side stage needs to see individual updates, which secure aggregation forbids.

A stage may keep explicit server state (``init``/``server``) and send part of it to the
clients each round (``client_config``), e.g. an adaptive clipping norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from .. import tree
from ..errors import ConfigError
from ..tree import Params
from ..types import ClientInfo, RoundInfo

__all__ = ["ClipByNorm", "Stage", "StageState", "clip_by_norm"]

StageState = dict[str, Any]
"""A stage's server state: tensors and numbers, saved in checkpoints."""

RunsAt = Literal["client", "coordinator"]


class Stage:
    """Base class of stages; every method defaults to the identity.

    Subclasses override what they need: ``client`` (per update), ``server`` (on the aggregate),
    ``init`` and ``client_config`` (state and what clients must know of it).
    """

    runs_at: RunsAt = "client"
    protects_updates: bool = False
    """Whether the stage gives the update a guarantee (DP noise, secrecy) that covers only the
    tensors the pipeline aggregates: an algorithm that sends other tensors beside the update
    (SCAFFOLD's control variates) would send them unprotected, so it refuses such a stage."""

    def init(self) -> StageState:
        """The server state before the first round."""
        return {}

    def client_config(self, state: StageState) -> dict[str, Any]:
        """What the per-update half needs to know this round (sent to clients; JSON-able)."""
        return {}

    def extra_tensors(self) -> Params:
        """Tensors (name -> zero template) the per-update half adds to each update, reduced
        with it and removed by the server half (e.g. DP-FedAvg's clipped-count bit)."""
        return {}

    def check_reducer(self, reducer: Any) -> None:
        """Raise :class:`~shoal.errors.AggregationError` if this stage cannot work with
        ``reducer`` (called by :class:`~shoal.aggregate.Pipeline` at construction)."""

    def client(self, update: Params, config: Mapping[str, Any], info: ClientInfo) -> Params:
        """The per-update half."""
        return update

    def server(self, aggregate: Params, state: StageState,
               info: RoundInfo) -> tuple[Params, StageState, dict[str, float]]:
        """The server half: ``(aggregate, state, info) -> (aggregate, state, metrics)``."""
        return aggregate, state, {}


class ClipByNorm(Stage):
    """Scale each update so its global L2 norm is at most ``max_norm`` (never increases it).

    ``runs_at="client"`` clips where the update is made (as DP-FedAvg does);
    ``runs_at="coordinator"`` clips every received update at the coordinator, which bounds the
    influence of a malicious client (norm bounding, Sun et al. 2019).
    """

    def __init__(self, max_norm: float, runs_at: RunsAt = "client"):
        if not max_norm > 0:
            raise ConfigError(f"clip_by_norm: max_norm must be > 0 (got {max_norm}).")
        if runs_at not in ("client", "coordinator"):
            raise ConfigError(
                f"clip_by_norm: runs_at must be 'client' or 'coordinator' (got {runs_at!r})."
            )
        self.max_norm = float(max_norm)
        self.runs_at = runs_at

    def __repr__(self) -> str:
        where = "" if self.runs_at == "client" else f", runs_at={self.runs_at!r}"
        return f"clip_by_norm({self.max_norm:g}{where})"

    def client(self, update: Params, config: Mapping[str, Any], info: ClientInfo) -> Params:
        n = tree.norm(update)
        if n <= self.max_norm:
            return update
        return tree.scale(update, self.max_norm / n)


def clip_by_norm(max_norm: float, runs_at: RunsAt = "client") -> ClipByNorm:
    """A stage that clips each update to L2 norm ``max_norm``; see :class:`ClipByNorm`."""
    return ClipByNorm(max_norm, runs_at)
