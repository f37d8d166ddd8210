"""``Node``: a participant that answers messages with handlers, wrapped in middleware.

A node has handlers by message kind, a chain of ``Mod``s (middleware for cross-cutting
concerns: simulated dropout, size logging, masking) and a persistent ``NodeContext``: its id,
its data, scratch space for multi-step protocols (``state``), the algorithm-owned state it
keeps between rounds (``node_state``, see :class:`NodeStore`) and, where the transport offers
it, a link to other nodes (``peers``).

Handlers may declare abilities beyond answering one message (:class:`CapableHandler`): a
batched form an executor can run for a whole cohort at once, and whether their computation can
move to a device. Executors ask for these; they never recognise an algorithm by its class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .message import Message
from .tree import Params

__all__ = ["Abilities", "BatchAnswers", "BatchHandler", "CapableHandler", "Handler", "Mod",
           "Node", "NodeContext", "NodeState", "NodeStore", "Peers", "abilities_of"]


class NodeState(MutableMapping[str, Any]):
    """The algorithm-owned state a node sees while it answers one message: a mapping of names
    to tensors, numbers, strings and lists or dicts of them (e.g. SCAFFOLD's control variate).

    Replace values rather than changing tensors in place: earlier versions share them (see
    :class:`NodeStore`)."""

    def __init__(self, entries: Mapping[str, Any] | None = None):
        self._entries: dict[str, Any] = dict(entries or {})
        self.changed = False

    def __getitem__(self, key: str) -> Any:
        return self._entries[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._entries[key] = value
        self.changed = True

    def __delitem__(self, key: str) -> None:
        del self._entries[key]
        self.changed = True

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"NodeState({sorted(self._entries)})"

    def replace_with(self, other: NodeState) -> None:
        """Take ``other``'s entries (and its changed flag)."""
        self._entries = dict(other._entries)
        self.changed = other.changed


class NodeStore:
    """The versions of one node's :class:`NodeState`, by the round that wrote them.

    A message of round ``r`` sees the newest version written before round ``r``; what its
    handler writes becomes version ``r``. So a round that is run again — after the coordinator
    resumed from an earlier checkpoint — starts from the same state as the first time, and a
    resumed run stays bit-identical. The newest ``keep`` versions are kept.
    """

    def __init__(self, versions: Mapping[int, Mapping[str, Any]] | None = None, keep: int = 3):
        self.versions: dict[int, dict[str, Any]] = {int(r): dict(v)
                                                    for r, v in (versions or {}).items()}
        self.keep = keep

    def __bool__(self) -> bool:
        return bool(self.versions)

    def __repr__(self) -> str:
        return f"NodeStore(rounds={sorted(self.versions)})"

    def view(self, round: int) -> NodeState:
        """The state a message of ``round`` sees: the newest version before ``round``."""
        before = [r for r in self.versions if r < round]
        return NodeState(self.versions[max(before)] if before else None)

    def commit(self, round: int, state: NodeState) -> None:
        """Store ``state`` as version ``round`` (dropping versions past it, which a rerun of an
        earlier round makes stale), keeping the newest ``keep``."""
        for r in [r for r in self.versions if r > round]:
            del self.versions[r]
        self.versions[round] = dict(state)
        for r in sorted(self.versions)[:-self.keep]:
            del self.versions[r]

    def upto(self, round: int) -> NodeStore:
        """The versions written in rounds ``<= round`` (what a checkpoint after ``round``
        holds)."""
        return NodeStore({r: v for r, v in self.versions.items() if r <= round}, self.keep)


class Peers(Protocol):
    """A node's link to other nodes: ``request(messages)`` with ``src`` = this node."""

    def request(self, messages: Sequence[Message],
                timeout: float | None = None) -> list[Message]:
        """Deliver ``messages`` (from this node) and return one reply per message."""
        ...


@dataclass
class NodeContext:
    """What a node keeps: its ``node_id``, its ``data`` (which never leaves it), ``state`` —
    scratch space for multi-step protocols within a round (secure-aggregation keys, a split
    learning session; never checkpointed) — the algorithm-owned ``node_state`` it keeps between
    rounds (checkpointed, see :class:`NodeStore`), ``peers`` to send messages to other
    nodes (``None`` where the transport offers no such link) and its ``credentials``."""

    node_id: str
    data: Any = None
    state: dict[str, Any] = field(default_factory=dict)
    store: NodeStore = field(default_factory=NodeStore)
    node_state: NodeState = field(default_factory=NodeState)
    peers: Peers | None = None
    credentials: Any = None
    """What the node signs with and checks its peers' signatures by (a
    :class:`~shoal.credentials.Credentials`; ``None``: it cannot sign)."""


Handler = Callable[[Message, NodeContext], Message]
"""Answers one message: ``handler(message, context) -> reply``."""

Mod = Callable[[Message, NodeContext, Handler], Message]
"""Middleware: ``mod(message, context, next_handler) -> reply``; may answer without calling
``next_handler`` (a dropout), or change the message or the reply."""


@dataclass
class BatchAnswers:
    """What a :class:`BatchHandler` computed for a batch of messages.

    ``replies[i]`` answers ``messages[i]``. ``rows`` maps ``i`` to ``(stacks, j)`` when every
    tensor of reply ``i`` is row ``j`` of the stacked tensor of the same name in ``stacks``
    (``(C, *shape)``), so a fold can reduce the whole batch with one operation per tensor."""

    replies: list[Message]
    rows: dict[int, tuple[Params, int]] = field(default_factory=dict)


class BatchHandler:
    """Answers many messages of one kind at once (e.g. a cohort's local training as one
    batched computation); the contexts' ``node_state`` views take what each node writes.

    ``numel`` is the size of one node's computation in parameters (``auto`` batches small
    models only); :meth:`trial` runs one node on a tiny slice of its data and raises if the
    batched form cannot run it."""

    numel: int = 0

    def __call__(self, messages: Sequence[Message],
                 contexts: Sequence[NodeContext]) -> BatchAnswers:
        raise NotImplementedError

    def trial(self, context: NodeContext) -> None:
        """Run one node on a tiny slice of its data; raise when that fails."""


@dataclass(frozen=True)
class Abilities:
    """What a handler can do beyond answering one message.

    ``batch()`` builds its batched form (raising :class:`~shoal.errors.ConfigError` or
    :class:`~shoal.errors.ModelError` that says why it cannot); ``None`` means it has none, for
    the reason ``why_not_batched``. ``place(device)`` moves its computation to ``device``
    (``None``: it cannot move)."""

    batch: Callable[[], BatchHandler] | None = None
    why_not_batched: str = "it declares no batched form"
    place: Callable[[torch.device], None] | None = None


class CapableHandler:
    """A handler (``fn(message, context) -> reply``) with declared :class:`Abilities`."""

    def __init__(self, fn: Handler, abilities: Abilities):
        self.fn = fn
        self.abilities = abilities

    def __call__(self, message: Message, context: NodeContext) -> Message:
        return self.fn(message, context)

    def __repr__(self) -> str:
        return f"CapableHandler({self.fn!r})"


_NONE = Abilities()


def abilities_of(handler: Handler | None) -> Abilities:
    """The abilities ``handler`` declares (none for a plain function)."""
    return handler.abilities if isinstance(handler, CapableHandler) else _NONE


class Node:
    """Dispatches each message to the handler of its kind, through the mods (outermost first).

    A message of a kind the node has no handler for gets an error reply naming the known kinds;
    exceptions raised by handlers propagate (the transport decides what a failure means). The
    handler sees the node's state as of before the message's round (``context.node_state``);
    what it writes is committed to the node's :class:`NodeStore` when it returns (and handed
    to ``persist``, e.g. to write a deployed client's state to its disk).
    """

    def __init__(self, context: NodeContext, handlers: Mapping[str, Handler],
                 mods: Sequence[Mod] = (), persist: Callable[[NodeStore], None] | None = None):
        self.context = context
        self.handlers = dict(handlers)
        self.mods = tuple(mods)
        self.persist = persist

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.context.node_id

    def handle(self, message: Message) -> Message:
        """The reply to ``message``."""
        handler = self.handlers.get(message.kind)
        if handler is None:
            return message.failed(
                f"node {self.node_id!r} has no handler for message kind {message.kind!r}; "
                f"it handles {', '.join(sorted(self.handlers)) or 'nothing'}."
            )
        call: Handler = handler
        for mod in reversed(self.mods):
            call = _wrap(mod, call)
        ctx = self.context
        view = ctx.store.view(message.round) if ctx.store else NodeState()
        here = NodeContext(ctx.node_id, ctx.data, ctx.state, ctx.store, view, ctx.peers,
                           ctx.credentials)
        reply = call(message, here)
        if view.changed:
            ctx.store.commit(message.round, view)
            if self.persist is not None:
                self.persist(ctx.store)
        return reply


def _wrap(mod: Mod, inner: Handler) -> Handler:
    return lambda message, context: mod(message, context, inner)
