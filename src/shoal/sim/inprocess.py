"""The in-process transport: simulated nodes answer by direct calls (no serialisation, no
polling); how the calls are computed (one after the other, batched, in worker processes) is
its executor's business (:mod:`shoal.sim.executor`).

Nodes are built on demand from their ids, so a population costs nothing per client beyond its
data's row ranges (numbered ids are a :class:`~shoal.data.ids.ClientIds`, never a list of a
million strings); only what a node keeps — its scratch space while a multi-step protocol runs,
its algorithm-owned state (:class:`~shoal.node.NodeStore`) — is stored, and only while it holds
something.

Any node can address any node: a handler sends messages to its peers with ``context.peers``
(``src`` = its own id), delivered and counted like the coordinator's, per link.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Literal

from ..algorithms.collect import Partial, RoundFold
from ..credentials import RunKeys
from ..data.ids import ClientIds, as_ids
from ..errors import ClientError, ConfigError, TransportError
from ..message import Message
from ..node import Handler, Mod, Node, NodeContext, NodeState, NodeStore
from ..transport import Transport, timed
from .executor import Executor, make_executor

__all__ = ["InProcessTransport", "PeerLink"]

log = logging.getLogger(__name__)

OnError = Literal["drop", "raise"]


class PeerLink:
    """A simulated node's link to the other nodes of its transport: messages it sends (with
    ``src`` = its id) are delivered like the coordinator's and counted on their link."""

    def __init__(self, transport: InProcessTransport, node_id: str):
        self.transport = transport
        self.node_id = node_id

    def request(self, messages: Sequence[Message], timeout: float | None = None) -> list[Message]:
        """Deliver each message (``src`` must be this node) and return the replies."""
        out = []
        for m in messages:
            if m.src != self.node_id:
                raise TransportError(f"node {self.node_id!r} cannot send a message as "
                                     f"{m.src!r}; set src={self.node_id!r}.")
            reply = self.transport.deliver(m, timeout)
            self.transport.record(m, reply)
            out.append(reply)
        return out


class InProcessTransport(Transport):
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

    Every node signs with a per-run key (``keys``, :class:`~shoal.credentials.RunKeys`; a
    fresh secret by default, the same object in every worker process of an executor).

    ``executor`` computes the replies: ``"sequential"`` (default), ``"vectorized"``,
    ``"processes"``, ``"auto"`` or an :class:`~shoal.sim.executor.Executor`; see
    :mod:`shoal.sim.executor`. Call :meth:`close` (or use the transport as a context manager)
    to stop an executor's worker processes.
    """

    def __init__(self, node_ids: Sequence[str], data_fn: Callable[[str], Any],
                 handlers: Mapping[str, Handler], *, mods: Sequence[Mod] = (),
                 on_error: OnError = "drop", executor: str | Executor | None = None,
                 keys: RunKeys | None = None):
        super().__init__()
        if on_error not in ("drop", "raise"):
            raise ConfigError(f"InProcessTransport: on_error must be 'drop' or 'raise' "
                              f"(got {on_error!r}).")
        self._ids = as_ids(node_ids)  # a ClientIds stays one: no string per simulated node
        self._known: Collection[str] = (self._ids if isinstance(self._ids, ClientIds)
                                        else frozenset(self._ids))
        self.data_fn = data_fn
        self.handlers = dict(handlers)
        self.mods = tuple(mods)
        self.on_error: OnError = on_error
        self._scratch: dict[str, dict[str, Any]] = {}
        self._stores: dict[str, NodeStore] = {}
        self.keys = keys if keys is not None else RunKeys()
        self.executor = make_executor(executor)

    def __enter__(self) -> InProcessTransport:
        return self

    def close(self) -> None:
        """Release the executor's resources (worker processes)."""
        self.executor.close()

    def knows(self, node_id: str) -> bool:
        """Whether ``node_id`` is one of the simulated nodes."""
        return node_id in self._known

    def nodes(self) -> Sequence[str]:
        """Every simulated node id (an immutable sequence, not copied)."""
        return self._ids

    # -- nodes ---------------------------------------------------------------------------------

    def context(self, node_id: str, round: int | None = None) -> NodeContext:
        """Node ``node_id``'s context: its data, scratch space, state store and peer link;
        with ``round``, its ``node_state`` as a message of that round sees it. (Read-only: a
        node that keeps nothing is not stored; :meth:`node` is the one to change.)"""
        store = self._stores.get(node_id) or NodeStore()
        view = store.view(round) if round is not None and store else NodeState()
        return NodeContext(node_id, self.data_fn(node_id), self._scratch.get(node_id, {}), store,
                           view, PeerLink(self, node_id), self.keys.for_node(node_id))

    def node(self, node_id: str, handlers: Mapping[str, Handler] | None = None) -> Node:
        """The simulated node ``node_id`` (built on demand; what it keeps persists), answering
        with ``handlers`` (default: the transport's)."""
        ctx = self.context(node_id)
        ctx.state = self._scratch.setdefault(node_id, ctx.state)
        ctx.store = self._stores.setdefault(node_id, ctx.store)
        return Node(ctx, self.handlers if handlers is None else handlers, self.mods)

    def _keep(self, context: NodeContext) -> None:
        """Store what the node now keeps (and forget a node that keeps nothing)."""
        node_id = context.node_id
        if context.state:
            self._scratch[node_id] = context.state
        else:
            self._scratch.pop(node_id, None)
        if context.store:
            self._stores[node_id] = context.store
        else:
            self._stores.pop(node_id, None)

    def node_states(self) -> dict[str, NodeStore]:
        """Every node's algorithm-owned state (nodes that keep none are left out)."""
        return dict(self._stores)

    def restore_node_states(self, states: Mapping[str, NodeStore]) -> None:
        """Replace the nodes' algorithm-owned state (a resumed run, or a worker process's
        clients for one round)."""
        for node_id, store in states.items():
            if store:
                self._stores[node_id] = store
            else:
                self._stores.pop(node_id, None)

    def forget(self, node_ids: Sequence[str]) -> None:
        """Drop the state of ``node_ids`` (a worker process after handing it back)."""
        for n in node_ids:
            self._stores.pop(n, None)

    # -- messages ------------------------------------------------------------------------------

    def request(self, messages: Sequence[Message], timeout: float | None = None) -> list[Message]:
        """Deliver each message in order; see the class docstring for failures."""
        return list(self.stream(messages, timeout))

    def stream(self, messages: Sequence[Message],
               timeout: float | None = None) -> Iterator[Message]:
        """Deliver the messages one at a time as the replies are consumed (lazily, in order;
        the executor shows each to the observers)."""
        return timed(self, iter(self.executor.stream(self, messages, timeout)))

    def collect(self, requests: Sequence[Message], fold: RoundFold,
                timeout: float | None = None) -> Partial:
        """A round's train replies, folded by the executor (where they are computed; the
        time spent producing replies counts as the transport's, the folding as the
        coordinator's)."""
        return self.executor.collect(self, requests, fold, timeout)

    def deliver(self, message: Message, timeout: float | None,
                answer: Message | None = None, state: NodeState | None = None) -> Message:
        """The node's reply to ``message``, through its mods; ``answer`` is a reply computed
        beforehand (by a batching executor) that the node's handler gives instead of computing
        it, with the node ``state`` that computation wrote (kept only if the handler is
        reached). Failures: see the class docstring."""
        if message.dst not in self._known:
            return message.failed(f"unknown node {message.dst!r}: no simulated node has this id.")
        if answer is not None and not self.mods:
            # What the node would answer: no middleware to run, nothing to time.
            if state is not None and state.changed:
                self._stores.setdefault(message.dst, NodeStore()).commit(message.round, state)
            return answer
        handlers = None
        if answer is not None:
            def precomputed(m: Message, c: NodeContext) -> Message:
                if state is not None:
                    c.node_state.replace_with(state)
                return answer
            handlers = {**self.handlers, message.kind: precomputed}
        node = self.node(message.dst, handlers)
        start = time.perf_counter()
        try:
            reply = node.handle(message)
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
        finally:
            self._keep(node.context)
        elapsed = time.perf_counter() - start
        if answer is None:
            self.record_compute(message.dst, elapsed)
        if timeout is not None and elapsed > timeout:
            return message.failed(f"timed out: answered after {elapsed:.3g} s, "
                                  f"the limit is {timeout:g} s")
        return reply
