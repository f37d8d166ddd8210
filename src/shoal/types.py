"""Small value types shared by clients, stages, reducers and algorithms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .tree import Params

__all__ = ["ClientInfo", "ClientResult", "RoundInfo"]


@dataclass(frozen=True)
class ClientInfo:
    """Who is computing, when, and with which randomness.

    ``seed`` is this client's seed for this round (derived from the run's seed, the round and
    the client id); ``config`` carries what the coordinator sent along with the model.
    """

    client_id: str
    round: int
    seed: int
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ClientResult:
    """A client's answer: the ``update`` to add to the global params, its aggregation ``weight``
    (the number of examples it trained on) and its ``metrics``."""

    update: Params
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundInfo:
    """What the coordinator knows when it aggregates a round.

    ``sampled`` clients were asked, ``replied`` sent a valid update, out of a ``population``.
    """

    round: int
    seed: int
    sampled: int
    replied: int
    population: int
