"""``Algorithm``: who sends what to whom, one round at a time.

An algorithm is a conversation. The coordinator side is ``init`` and ``round``; the other side
is ``handlers()``, which the nodes run (simulated in-process, or real over the network: the
same object either way). Compose FedAvg when only the math changes (FedProx, FedAdam,
DP-FedAvg, robust FedAvg); write a new Algorithm when the conversation changes (split learning,
swarm learning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from .node import Handler
from .transport import Transport
from .tree import Params

__all__ = ["Algorithm", "RoundReport"]

S = TypeVar("S")


@dataclass
class RoundReport:
    """What happened in one round.

    ``metrics`` are slash-namespaced numbers (``train/loss``, ``round/replied``); ``dropped``
    maps each node that was asked but did not count to the reason; ``failed`` says why the
    round's update was not applied (too few replies), or is ``None``; ``retry`` says that the
    round failed for want of participants, so running it again may succeed (see
    :func:`shoal.run.run`'s ``round_retries``).
    """

    round: int
    metrics: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    failed: str | None = None
    retry: bool = False


class Algorithm(Protocol[S]):
    """The coordinator's side (``init``, ``round``, ``params``) and the nodes' (``handlers``)."""

    def init(self, params: Params) -> S:
        """The state before round 1, from the initial global params."""
        ...

    def round(self, state: S, transport: Transport, round: int) -> tuple[S, RoundReport]:
        """Run round ``round`` (1-based) over ``transport``; return the new state and a report."""
        ...

    def params(self, state: S) -> Params:
        """The global model's params in ``state``."""
        ...

    def handlers(self) -> dict[str, Handler]:
        """The nodes' side of the conversation: a handler per message kind."""
        ...

