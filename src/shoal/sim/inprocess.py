"""The in-process transport: simulated nodes answer by direct calls (no serialisation, no
polling); how the calls are computed (one after the other, batched, in worker processes) is
its executor's business (:mod:`shoal.sim.executor`).

Nodes are built on demand from their ids, so a population of 10,000 clients costs an id and an
index tensor each; only a node's persistent ``state`` (if its handlers keep any) is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from ..algorithms.collect import Partial, RoundFold
from ..errors import ClientError
from ..message import Message
from ..node import Handler, Mod, Node, NodeContext
from ..transport import TrafficStats
from .executor import Executor, make_executor

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

    ``executor`` computes the replies: ``"sequential"`` (default), ``"vectorized"``,
    ``"processes"``, ``"auto"`` or an :class:`~shoal.sim.executor.Executor`; see
    :mod:`shoal.sim.executor`. Call :meth:`close` (or use the transport as a context manager)
    to stop an executor's worker processes.
    """

    def __init__(self, node_ids: Sequence[str], data_fn: Callable[[str], Any],
                 handlers: Mapping[str, Handler], *, mods: Sequence[Mod] = (),
                 on_error: OnError = "drop", executor: str | Executor | None = None):
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
        self.executor = make_executor(executor)

    def __enter__(self) -> InProcessTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the executor's resources (worker processes)."""
        self.executor.close()

    def knows(self, node_id: str) -> bool:
        """Whether ``node_id`` is one of the simulated nodes."""
        return node_id in self._known

    def nodes(self) -> list[str]:
        """Every simulated node id."""
        return list(self._ids)

    def node(self, node_id: str, handlers: Mapping[str, Handler] | None = None) -> Node:
        """The simulated node ``node_id`` (built on demand; its state persists), answering with
        ``handlers`` (default: the transport's)."""
        state = self._states.setdefault(node_id, {})
        return Node(NodeContext(node_id, self.data_fn(node_id), state),
                    self.handlers if handlers is None else handlers, self.mods)

    def request(self, messages: Sequence[Message], timeout: float | None = None) -> list[Message]:
        """Deliver each message in order; see the class docstring for failures."""
        return list(self.stream(messages, timeout))

    def stream(self, messages: Sequence[Message],
               timeout: float | None = None) -> Iterator[Message]:
        """Deliver the messages one at a time as the replies are consumed (lazily, in order)."""
        for m, reply in zip(messages, self.executor.stream(self, messages, timeout), strict=True):
            self.stats.record(m, reply)
            yield reply

    def collect(self, requests: Sequence[Message], fold: RoundFold,
                timeout: float | None = None) -> Partial:
        """A round's train replies, folded by the executor (where they are computed)."""
        return self.executor.collect(self, requests, fold, timeout)

    def deliver(self, message: Message, timeout: float | None,
                answer: Message | None = None) -> Message:
        """The node's reply to ``message``, through its mods; ``answer`` is a reply computed
        beforehand (by a batching executor) that the node's handler gives instead of computing
        it. Failures: see the class docstring."""
        if message.dst not in self._known:
            return message.failed(f"unknown node {message.dst!r}: no simulated node has this id.")
        if answer is not None and not self.mods:
            return answer  # what the node would answer: no middleware to run, nothing to time
        handlers = None if answer is None else {**self.handlers,
                                                message.kind: lambda m, c: answer}
        start = time.perf_counter()
        try:
            reply = self.node(message.dst, handlers).handle(message)
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
