"""``Transport``: delivers a batch of messages and returns one reply per message.

A node that fails or times out comes back as a reply with ``error`` set; the algorithm decides
what a dropout means. Implementations: the in-process transport of the simulator
(``shoal.sim``), a function transport for tests (here), and gRPC for deployment.

Every message that crosses a transport — a request and its reply, from any node to any node —
is shown to the transport's *observers* in one place (:meth:`Transport.record`). The built-in
observer is :class:`TrafficStats` (``transport.stats``), which counts messages and bytes per
link (sender -> receiver) and per message kind, and each node's compute time; an audit adds its
own observer to see what an honest-but-curious coordinator or peer sees (:mod:`shoal.observe`).

What a transport can do beyond delivering messages is declared by this base class with
defaults, never probed: :meth:`Transport.collect` folds a round's replies (a transport whose
executor computes replies in worker processes folds them there), :meth:`Transport.node_states`
hands out the algorithm-owned state its nodes keep (for checkpoints), :meth:`Transport.close`
releases what it holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import TransportError
from .message import COORDINATOR, Message

__all__ = ["FunctionTransport", "Link", "Observer", "TrafficStats", "TrafficTotals", "Transport",
           "timed"]


class Observer:
    """Sees every message a transport carries (:meth:`on_message`) and the compute time nodes
    spend answering them (:meth:`on_compute`); both do nothing by default.

    An executor that computes replies in worker processes gives each worker a :meth:`part`
    (a fresh, empty observer of the same kind) and :meth:`merge` s the workers' parts back, so
    an observer sees the same messages whichever executor runs. ``part`` returns ``None`` for
    an observer that cannot be sent to another process (the executor then refuses to run)."""

    def on_message(self, message: Message, nbytes: int) -> None:
        """``message`` (``nbytes`` long on a wire) crossed the transport."""

    def on_compute(self, node_id: str, seconds: float) -> None:
        """Node ``node_id`` spent ``seconds`` computing an answer."""

    def part(self) -> Observer | None:
        """An empty observer of the same kind for a worker process (``None``: not possible)."""
        return type(self)()

    def merge(self, other: Observer) -> None:
        """Add what a worker's :meth:`part` observed."""


@dataclass
class Link:
    """What crossed one link (``src -> dst``) or was of one kind: messages and bytes."""

    messages: int = 0
    bytes: int = 0


@dataclass
class TrafficTotals:
    """A snapshot of the totals of :class:`TrafficStats` (see there)."""

    messages_down: int = 0
    messages_up: int = 0
    messages_peer: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_peer: int = 0
    kinds: dict[str, tuple[int, int]] = field(default_factory=dict)
    compute_s: float = 0.0


class TrafficStats(Observer):
    """Counts what crossed a transport.

    *Down* is what the coordinator sent (``src == COORDINATOR``), *up* what it received
    (``dst == COORDINATOR``), *peer* every other message (node to node). ``links`` holds the
    cumulative messages and bytes of each ``(src, dst)`` link, ``kinds`` of each message kind,
    ``compute`` each node's seconds spent answering messages (in simulation). The per-round
    figures of the run loop are differences of :meth:`snapshot` s.
    """

    def __init__(self) -> None:
        self.messages_down = self.messages_up = self.messages_peer = 0
        self.bytes_down = self.bytes_up = self.bytes_peer = 0
        self.links: dict[tuple[str, str], Link] = {}
        self.kinds: dict[str, Link] = {}
        self.compute: dict[str, float] = {}
        self.compute_s = 0.0

    def on_message(self, message: Message, nbytes: int) -> None:
        """Count ``message`` on its link, its kind and its direction."""
        self.count(message.src, message.dst, message.kind, nbytes)

    def count(self, src: str, dst: str, kind: str, nbytes: int, messages: int = 1) -> None:
        """Count traffic on the link ``src -> dst``: also for what crosses outside messages
        (data-parallel collectives on ``torch.distributed``)."""
        if src == COORDINATOR:
            self.messages_down += messages
            self.bytes_down += nbytes
        elif dst == COORDINATOR:
            self.messages_up += messages
            self.bytes_up += nbytes
        else:
            self.messages_peer += messages
            self.bytes_peer += nbytes
        link = self.links.get((src, dst))
        if link is None:
            link = self.links[(src, dst)] = Link()
        link.messages += messages
        link.bytes += nbytes
        k = self.kinds.get(kind)
        if k is None:
            k = self.kinds[kind] = Link()
        k.messages += messages
        k.bytes += nbytes

    def on_compute(self, node_id: str, seconds: float) -> None:
        """Add ``seconds`` to ``node_id``'s compute time."""
        self.compute[node_id] = self.compute.get(node_id, 0.0) + seconds
        self.compute_s += seconds

    def merge(self, other: Observer) -> None:
        """Add another :class:`TrafficStats`' counts (a worker process's)."""
        assert isinstance(other, TrafficStats)
        for name in ("messages_down", "messages_up", "messages_peer", "bytes_down", "bytes_up",
                     "bytes_peer"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.links, other.links), (self.kinds, other.kinds)):
            for key, link in theirs.items():
                got = mine.setdefault(key, Link())  # type: ignore[arg-type]
                got.messages += link.messages
                got.bytes += link.bytes
        for node, s in other.compute.items():
            self.compute[node] = self.compute.get(node, 0.0) + s
        self.compute_s += other.compute_s

    @property
    def bytes_total(self) -> int:
        """Every byte counted, in every direction."""
        return self.bytes_down + self.bytes_up + self.bytes_peer

    def snapshot(self) -> TrafficTotals:
        """The current totals (not the links: they are only ever read cumulatively)."""
        return TrafficTotals(self.messages_down, self.messages_up, self.messages_peer,
                             self.bytes_down, self.bytes_up, self.bytes_peer,
                             {k: (v.messages, v.bytes) for k, v in self.kinds.items()},
                             self.compute_s)

    def since(self, earlier: TrafficTotals) -> TrafficTotals:
        """What was counted after ``earlier`` was taken."""
        now = self.snapshot()
        kinds = {}
        for k, (m, b) in now.kinds.items():
            m0, b0 = earlier.kinds.get(k, (0, 0))
            if m > m0:
                kinds[k] = (m - m0, b - b0)
        return TrafficTotals(now.messages_down - earlier.messages_down,
                             now.messages_up - earlier.messages_up,
                             now.messages_peer - earlier.messages_peer,
                             now.bytes_down - earlier.bytes_down,
                             now.bytes_up - earlier.bytes_up,
                             now.bytes_peer - earlier.bytes_peer, kinds,
                             now.compute_s - earlier.compute_s)

    def participants(self) -> dict[str, dict[str, float]]:
        """Per node: messages and bytes sent and received, and compute seconds."""
        out: dict[str, dict[str, float]] = {}

        def row(node: str) -> dict[str, float]:
            r = out.get(node)
            if r is None:
                r = out[node] = {"messages_sent": 0.0, "bytes_sent": 0.0,
                                 "messages_received": 0.0, "bytes_received": 0.0,
                                 "compute_s": 0.0}
            return r

        for (src, dst), link in self.links.items():
            s, d = row(src), row(dst)
            s["messages_sent"] += link.messages
            s["bytes_sent"] += link.bytes
            d["messages_received"] += link.messages
            d["bytes_received"] += link.bytes
        for node, sec in self.compute.items():
            row(node)["compute_s"] += sec
        return out

    def state(self) -> dict[str, Any]:
        """The counts as JSON-able values (saved with checkpoints)."""
        return {"totals": [self.messages_down, self.messages_up, self.messages_peer,
                           self.bytes_down, self.bytes_up, self.bytes_peer],
                "links": [[s, d, v.messages, v.bytes] for (s, d), v in self.links.items()],
                "kinds": {k: [v.messages, v.bytes] for k, v in self.kinds.items()},
                "compute": dict(self.compute)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace the counts with :meth:`state`'s (after a resume)."""
        (self.messages_down, self.messages_up, self.messages_peer, self.bytes_down,
         self.bytes_up, self.bytes_peer) = (int(x) for x in state["totals"])
        self.links = {(s, d): Link(int(m), int(b)) for s, d, m, b in state["links"]}
        self.kinds = {k: Link(int(m), int(b)) for k, (m, b) in state["kinds"].items()}
        self.compute = {k: float(v) for k, v in state["compute"].items()}
        self.compute_s = sum(self.compute.values())


class Transport:
    """Delivers messages to nodes and collects their replies; the base of every transport.

    A subclass implements :meth:`nodes` and :meth:`stream` (or :meth:`request`), and shows
    every message it carries to the observers by calling :meth:`record`. The other methods are
    optional abilities with safe defaults (see the module docstring)."""

    def __init__(self) -> None:
        self.stats = TrafficStats()
        self.observers: list[Observer] = [self.stats]
        self.busy_s = 0.0
        """Wall seconds spent inside the transport's calls (delivering, waiting, computing
        simulated clients); the run loop reports the rest of a round as the coordinator's."""

    def nodes(self) -> Sequence[str]:
        """The ids of the nodes that can be reached now, in a stable order (do not change the
        sequence returned)."""
        raise NotImplementedError

    def request(self, messages: Sequence[Message], timeout: float | None = None) -> list[Message]:
        """Deliver ``messages``; return one reply per message, in the same order.

        A node that fails, is unknown, or does not answer within ``timeout`` seconds is
        represented by a reply with ``error`` set.
        """
        return list(self.stream(messages, timeout))

    def stream(self, messages: Sequence[Message],
               timeout: float | None = None) -> Iterator[Message]:
        """The replies to ``messages`` in order, one at a time as they are consumed (a consumer
        that reduces as it goes holds one reply at a time). Default: :meth:`request`."""
        return iter(self.request(messages, timeout))

    def collect(self, requests: Sequence[Message], fold: Any,
                timeout: float | None = None) -> Any:
        """A round's replies folded by ``fold`` (a :class:`~shoal.algorithms.collect.RoundFold`):
        by default as they stream; a transport computing replies in parts folds each part where
        it is computed and merges the parts."""
        return fold.fold(requests, self.stream(requests, timeout))

    def observe(self, observer: Observer) -> Observer:
        """Show every message from now on to ``observer``; returns it."""
        self.observers.append(observer)
        return observer

    def unobserve(self, observer: Observer) -> None:
        """Stop showing messages to ``observer``."""
        self.observers.remove(observer)

    def record(self, *messages: Message) -> None:
        """Show ``messages`` (that crossed this transport) to every observer."""
        for m in messages:
            nbytes = m.nbytes()
            for o in self.observers:
                o.on_message(m, nbytes)

    def record_compute(self, node_id: str, seconds: float) -> None:
        """Tell every observer that ``node_id`` computed for ``seconds``."""
        for o in self.observers:
            o.on_compute(node_id, seconds)

    def node_states(self) -> dict[str, Any]:
        """The algorithm-owned state of every node this transport holds, by node id
        (:class:`~shoal.node.NodeStore` s; saved with checkpoints). Default: none — a deployed
        client keeps its own."""
        return {}

    def restore_node_states(self, states: Mapping[str, Any]) -> None:
        """Give the nodes the state :meth:`node_states` returned (on resume)."""
        if states:
            raise TransportError(f"{type(self).__name__} holds no node state, but the checkpoint "
                                 f"has state for {len(states)} node(s); resume with the "
                                 "transport the run was started with.")

    def close(self) -> None:
        """Release what the transport holds (worker processes, connections); nothing by
        default."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def timed(transport: Transport, inner: Iterator[Message]) -> Iterator[Message]:
    """``inner``, with the time spent producing each item added to ``transport.busy_s``."""
    while True:
        t0 = time.perf_counter()
        try:
            item = next(inner)
        except StopIteration:
            transport.busy_s += time.perf_counter() - t0
            return
        transport.busy_s += time.perf_counter() - t0
        yield item


class FunctionTransport(Transport):
    """A transport that answers with a plain function, for tests: ``fn(message) -> reply``."""

    def __init__(self, node_ids: Sequence[str], fn: Callable[[Message], Message]):
        super().__init__()
        self._nodes = list(node_ids)
        self.fn = fn

    def nodes(self) -> list[str]:
        """The node ids given at construction."""
        return list(self._nodes)

    def request(self, messages: Sequence[Message], timeout: float | None = None) -> list[Message]:
        """Call ``fn`` on each message in order."""
        replies = []
        for m in messages:
            t0 = time.perf_counter()
            reply = self.fn(m)
            self.busy_s += time.perf_counter() - t0
            self.record(m, reply)
            replies.append(reply)
        return replies
