"""The in-process transport: simulated nodes answer by direct calls (no serialisation, no
polling), one message after the other.

Nodes are built on demand from their ids, so a population of 10,000 clients costs an id and an
index tensor each; only a node's persistent ``state`` (if its handlers keep any) is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from ..errors import ClientError
from ..message import Message
from ..node import Handler, Mod, Node, NodeContext
from ..transport import TrafficStats

__all__ = ["InProcessTransport"]

log = logging.getLogger(__name__)

OnError = Literal["drop", "raise"]


class InProcessTransport:
    """Delivers messages to simulated nodes by calling their handlers directly.

    ``data_fn(node_id)`` gives a node's data; ``handlers`` and ``mods`` are the same for every
    node (the other side of the algorithm's conversation, plus middleware such as simulated
    dropout).

    An exception inside a node is, with ``on_error="drop"`` (default), logged with its
    traceback and turned into an error reply (a dropout the algorithm tolerates); with
    ``on_error="raise"`` it is re-raised as :class:`~shoal.errors.ClientError` naming the node
    and round, the original chained — the debugging mode. A call that takes longer than the
    request's ``timeout`` is treated as timed out: its reply is replaced by an error (direct
    calls cannot be pre-empted, so the time is spent, but the result is discarded as a real
    coordinator would).
    """

    def __init__(self, node_ids: Sequence[str], data_fn: Callable[[str], Any],
                 handlers: Mapping[str, Handler], *, mods: Sequence[Mod] = (),
                 on_error: OnError = "drop"):
        if on_error not in ("drop", "raise"):
            raise ValueError(f"InProcessTransport: on_error must be 'drop' or 'raise' "
                             f"(got {on_error!r}).")
        self._ids = list(node_ids)
        self._known = frozenset(self._ids)
        self.data_fn = data_fn
        self.handlers = dict(handlers)
        self.mods = tuple(mods)
        self.on_error: OnError = on_error
        self.stats = TrafficStats()
        self._states: dict[str, dict[str, Any]] = {}

    def nodes(self) -> list[str]:
        """Every simulated node id."""
        return list(self._ids)

    def node(self, node_id: str) -> Node:
        """The simulated node ``node_id`` (built on demand; its state persists)."""
        state = self._states.setdefault(node_id, {})
        return Node(NodeContext(node_id, self.data_fn(node_id), state), self.handlers, self.mods)

    def request(self, messages: Sequence[Message], timeout: float | None = None) -> list[Message]:
        """Deliver each message in order; see the class docstring for failures."""
        return list(self.stream(messages, timeout))

    def stream(self, messages: Sequence[Message],
               timeout: float | None = None) -> Iterator[Message]:
        """Deliver the messages one at a time as the replies are consumed (lazily, in order)."""
        for m in messages:
            reply = self._deliver(m, timeout)
            self.stats.record(m, reply)
            yield reply

    def _deliver(self, message: Message, timeout: float | None) -> Message:
        if message.dst not in self._known:
            return message.failed(f"unknown node {message.dst!r}: no simulated node has this id.")
        start = time.perf_counter()
        try:
            reply = self.node(message.dst).handle(message)
        except Exception as e:
            if self.on_error == "raise":
                if isinstance(e, ClientError):
                    raise
                raise ClientError(
                    f"node {message.dst!r} failed handling {message.kind!r} in round "
                    f"{message.round}: {type(e).__name__}: {e}",
                    client=message.dst, round=message.round,
                ) from e
            log.warning("node %s dropped from round %d: %s", message.dst, message.round, e,
                        exc_info=True)
            return message.failed(f"{type(e).__name__}: {e}")
        elapsed = time.perf_counter() - start
        if timeout is not None and elapsed > timeout:
            return message.failed(f"timed out: answered after {elapsed:.3g} s, "
                                  f"the limit is {timeout:g} s")
        return reply
