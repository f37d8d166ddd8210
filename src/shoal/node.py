"""``Node``: a participant that answers messages with handlers, wrapped in middleware.

A node has handlers by message kind, a chain of ``Mod``s (middleware for cross-cutting
concerns: simulated dropout, size logging, masking) and a persistent ``NodeContext`` (its id,
its data, and state kept between rounds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .message import Message

__all__ = ["Handler", "Mod", "Node", "NodeContext"]


@dataclass
class NodeContext:
    """What a node keeps: its ``node_id``, its ``data`` (which never leaves it) and ``state``
    that persists between rounds (e.g. a client's privacy accountant)."""

    node_id: str
    data: Any = None
    state: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Message, NodeContext], Message]
"""Answers one message: ``handler(message, context) -> reply``."""

Mod = Callable[[Message, NodeContext, Handler], Message]
"""Middleware: ``mod(message, context, next_handler) -> reply``; may answer without calling
``next_handler`` (a dropout), or change the message or the reply."""


class Node:
    """Dispatches each message to the handler of its kind, through the mods (outermost first).

    A message of a kind the node has no handler for gets an error reply naming the known kinds;
    exceptions raised by handlers propagate (the transport decides what a failure means).
    """

    def __init__(self, context: NodeContext, handlers: Mapping[str, Handler],
                 mods: Sequence[Mod] = ()):
        self.context = context
        self.handlers = dict(handlers)
        self.mods = tuple(mods)

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
        return call(message, self.context)


def _wrap(mod: Mod, inner: Handler) -> Handler:
    return lambda message, context: mod(message, context, inner)
