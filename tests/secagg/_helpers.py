"""Shared by the secure-aggregation tests: a transport that records what the coordinator
handles, a coordinator that deviates, and a federation of clients summing small seeded
vectors."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from shoal.message import Message
from shoal.secagg.protocol import SecAggClient
from shoal.seeding import numpy_rng
from shoal.sim import InProcessTransport, simulated_dropout

D = 16
BOUND = 3.0


def vector_of(client: str) -> np.ndarray:
    """The float input of ``client`` in the sum tests."""
    return numpy_rng(0, "input", client).normal(size=D)


def vector_input(message, context):  # an InputFn
    return [(vector_of(context.node_id), BOUND)]


class Recording:
    """Wraps a transport; keeps every request it sends and every reply the coordinator gets."""

    def __init__(self, inner: InProcessTransport):
        self.inner = inner
        self.stats = inner.stats
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def nodes(self) -> list[str]:
        return self.inner.nodes()

    def request(self, messages: Sequence[Message], timeout: float | None = None) -> list[Message]:
        return list(self.stream(messages, timeout))

    def stream(self, messages: Sequence[Message], timeout: float | None = None
               ) -> Iterator[Message]:
        self.sent.extend(messages)
        for reply in self.inner.stream(messages, timeout):
            self.received.append(reply)
            yield reply


class Coordinator:
    """A coordinator that deviates: every request passes ``rewrite`` before it is sent;
    every reply is kept."""

    def __init__(self, inner, rewrite: Callable[[Message], Message]):
        self.inner, self.rewrite = inner, rewrite
        self.stats = inner.stats
        self.replies: list[Message] = []

    def nodes(self) -> Sequence[str]:
        return self.inner.nodes()

    def stream(self, messages: Sequence[Message], timeout: float | None = None
               ) -> Iterator[Message]:
        for reply in self.inner.stream([self.rewrite(m) for m in messages], timeout):
            self.replies.append(reply)
            yield reply


def federation(n: int, seed: int = 0, drop: float = 0.0,
               kinds: Sequence[str] = ("secagg.masked_input",)) -> tuple[list[str], Recording]:
    ids = [f"c{i:03d}" for i in range(n)]
    client = SecAggClient({"sum": vector_input}, seed)
    mods = [simulated_dropout(drop, seed, kinds)] if drop else []
    return ids, Recording(InProcessTransport(ids, lambda _: None, client.handlers(), mods=mods))
