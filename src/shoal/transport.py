"""``Transport``: delivers a batch of messages and returns one reply per message.

A node that fails or times out comes back as a reply with ``error`` set; the algorithm decides
what a dropout means. Implementations: the in-process transport of the simulator
(``shoal.sim``), a function transport for tests (here), and gRPC for deployment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .message import Message

__all__ = ["FunctionTransport", "TrafficStats", "Transport", "replies"]


@dataclass
class TrafficStats:
    """Counters of what crossed the transport: messages and bytes each way."""

    messages_down: int = 0
    messages_up: int = 0
    bytes_down: int = 0
    bytes_up: int = 0

    def record(self, request: Message, reply: Message) -> None:
        """Count one request (coordinator -> node) and its reply (node -> coordinator)."""
        self.messages_down += 1
        self.bytes_down += request.nbytes()
        self.messages_up += 1
        self.bytes_up += reply.nbytes()

    def snapshot(self) -> TrafficStats:
        """A copy of the current counts."""
        return TrafficStats(self.messages_down, self.messages_up, self.bytes_down, self.bytes_up)

    def since(self, earlier: TrafficStats) -> TrafficStats:
        """What was counted after ``earlier`` was taken."""
        return TrafficStats(self.messages_down - earlier.messages_down,
                            self.messages_up - earlier.messages_up,
                            self.bytes_down - earlier.bytes_down,
                            self.bytes_up - earlier.bytes_up)


@runtime_checkable
class Transport(Protocol):
    """Delivers messages to nodes and collects their replies."""

    stats: TrafficStats

    def nodes(self) -> list[str]:
        """The ids of the nodes that can be reached now, in a stable order."""
        ...

    def request(self, messages: Sequence[Message], timeout: float | None = None) -> list[Message]:
        """Deliver ``messages``; return one reply per message, in the same order.

        A node that fails, is unknown, or does not answer within ``timeout`` seconds is
        represented by a reply with ``error`` set.
        """
        ...


def replies(transport: Transport, messages: Sequence[Message],
            timeout: float | None = None) -> Iterator[Message]:
    """The replies to ``messages`` in order, one at a time when the transport can stream them
    (``transport.stream``), so a consumer that reduces as it goes holds one reply at a time."""
    stream = getattr(transport, "stream", None)
    if stream is not None:
        return iter(stream(messages, timeout))
    return iter(transport.request(messages, timeout))


class FunctionTransport:
    """A transport that answers with a plain function, for tests: ``fn(message) -> reply``."""

    def __init__(self, node_ids: Sequence[str], fn: Callable[[Message], Message]):
        self._nodes = list(node_ids)
        self.fn = fn
        self.stats = TrafficStats()

    def nodes(self) -> list[str]:
        """The node ids given at construction."""
        return list(self._nodes)

    def request(self, messages: Sequence[Message], timeout: float | None = None) -> list[Message]:
        """Call ``fn`` on each message in order."""
        replies = []
        for m in messages:
            reply = self.fn(m)
            self.stats.record(m, reply)
            replies.append(reply)
        return replies
