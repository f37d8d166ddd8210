"""Observers: what a party of the conversation sees, recorded where every message passes.

A transport shows every message it carries to its observers (:meth:`~shoal.transport.Transport.
record`), whichever executor computes the replies (worker processes record into parts that are
merged back). :class:`Recorder` keeps the messages a chosen node sends and receives — the view
of an honest-but-curious coordinator, peer or split server — for audits and tests that must see
exactly what crossed, no more::

    coordinator = transport.observe(Recorder(COORDINATOR, kinds={"train"}))
    run(fedavg, transport, ...)
    updates = [m.tensors for m in coordinator.received]
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from .message import Message
from .transport import Observer

__all__ = ["Recorder", "Seen"]


@dataclass(frozen=True)
class Seen:
    """One message a recorder saw, and its size on a wire."""

    message: Message
    nbytes: int


class Recorder(Observer):
    """Keeps every message ``node`` sends or receives (``None``: every message), optionally
    only of ``kinds``, at most ``limit`` of them (the oldest are kept; ``dropped`` counts the
    rest). The tensors are the ones that crossed (not copies): do not change them."""

    def __init__(self, node: str | None = None, kinds: Collection[str] | None = None,
                 limit: int | None = None):
        self.node = node
        self.kinds = None if kinds is None else frozenset(kinds)
        self.limit = limit
        self.seen: list[Seen] = []
        self.dropped = 0

    def __repr__(self) -> str:
        return f"Recorder({self.node!r}, kinds={sorted(self.kinds or [])}, {len(self.seen)} seen)"

    def on_message(self, message: Message, nbytes: int) -> None:
        """Keep ``message`` if it is one this recorder watches."""
        if self.node is not None and self.node not in (message.src, message.dst):
            return
        if self.kinds is not None and message.kind not in self.kinds:
            return
        if self.limit is not None and len(self.seen) >= self.limit:
            self.dropped += 1
            return
        self.seen.append(Seen(message, nbytes))

    def part(self) -> Recorder:
        """An empty recorder watching the same messages (for a worker process)."""
        return Recorder(self.node, self.kinds, self.limit)

    def merge(self, other: Observer) -> None:
        """Add what a worker's part saw."""
        assert isinstance(other, Recorder)
        for s in other.seen:
            self.on_message(s.message, s.nbytes)
        self.dropped += other.dropped

    @property
    def sent(self) -> list[Message]:
        """The messages the watched node sent."""
        return [s.message for s in self.seen if s.message.src == self.node]

    @property
    def received(self) -> list[Message]:
        """The messages the watched node received."""
        return [s.message for s in self.seen if s.message.dst == self.node]

    def __iter__(self) -> Iterator[Message]:
        return (s.message for s in self.seen)

    def __len__(self) -> int:
        return len(self.seen)

    def nbytes(self) -> int:
        """The wire size of every message seen."""
        return sum(s.nbytes for s in self.seen)

    def clear(self) -> None:
        """Forget what was seen."""
        self.seen.clear()
        self.dropped = 0
