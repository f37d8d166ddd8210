"""Simulated client dropout: middleware that makes a node fail some of the messages it gets.

Real federations lose clients mid-round (a phone goes offline, a hospital's link drops). The
``simulated_dropout`` mod makes each node fail each message with probability ``rate``, drawn from
the run's seed, the round, the node and the message kind, so a dropout pattern is reproducible
and does not depend on which executor runs the clients.
"""

from __future__ import annotations

from collections.abc import Collection

from ..errors import ConfigError
from ..message import Message
from ..node import Handler, Mod, NodeContext
from ..seeding import numpy_rng

__all__ = ["SimulatedDropout", "simulated_dropout"]


class SimulatedDropout:
    """The mod :func:`simulated_dropout` returns (a class, so worker processes can receive it)."""

    def __init__(self, rate: float, seed: int, kinds: Collection[str] = ("train",)):
        if not 0 <= rate < 1:
            raise ConfigError(f"simulated_dropout: rate must be in [0, 1) (got {rate}).")
        self.rate = rate
        self.seed = seed
        self.kinds = frozenset(kinds)

    def __repr__(self) -> str:
        return f"simulated_dropout({self.rate:g}, {self.seed})"

    def __call__(self, message: Message, context: NodeContext, next_handler: Handler) -> Message:
        rate = self.rate
        if message.kind in self.kinds and rate > 0:
            draw = numpy_rng(self.seed, "dropout", message.round, message.kind,
                             context.node_id).random()
            if draw < rate:
                return message.failed(f"simulated dropout (rate {rate:g})")
        return next_handler(message, context)


def simulated_dropout(rate: float, seed: int, kinds: Collection[str] = ("train",)) -> Mod:
    """A mod failing messages of ``kinds`` with probability ``rate`` (error: ``"simulated
    dropout"``)."""
    return SimulatedDropout(rate, seed, kinds)
