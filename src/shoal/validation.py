"""``reply_problem``: the one check a reply passes before anything uses it.

Every conversation — FedAvg's and SCAFFOLD's train replies, split learning's steps, secure
aggregation's four steps, the gRPC coordinator matching a reply to its request — asks the same
questions of a reply, in the same order and with the same words: did the node fail, does the
reply answer this request (sender, addressee, kind, round), is its weight a finite number
> 0, and do its tensors match what was expected (names, shapes, dtypes, finite values)?
A reply that fails is dropped with the reason; it never reaches a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from . import tree
from .errors import UpdateError
from .message import Message

__all__ = ["reply_problem", "weight_problem"]


def weight_problem(weight: object) -> str | None:
    """Why ``weight`` is not a finite number > 0, or ``None``."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) \
            or not math.isfinite(weight) or weight <= 0:
        return f"weight must be a finite number > 0, got {weight!r}"
    return None


def reply_problem(request: Message, reply: Message, *,
                  template: Mapping[str, Tensor] | None = None, weight: bool = False,
                  finite: bool = True, what: str = "update") -> str | None:
    """Why ``reply`` cannot be used as the answer to ``request``, or ``None`` if it can.

    Checks, in order: the reply's error; that it comes from the node the request went to, is
    addressed to the request's sender and has the request's kind and round; with ``weight``,
    that ``config["weight"]`` is a finite number > 0; with a ``template``, that its tensors have
    exactly the template's names, shapes and dtypes and (unless ``finite`` is false) finite
    values (``what`` names the tensors in the reason).
    """
    if reply.error is not None:
        return reply.error
    if reply.src != request.dst:
        return f"reply from {reply.src!r} answers a request sent to {request.dst!r}"
    if reply.dst != request.src:
        return f"reply is addressed to {reply.dst!r}, expected {request.src!r}"
    if reply.round != request.round or reply.kind != request.kind:
        return (f"reply is for {reply.kind!r} round {reply.round}, "
                f"expected {request.kind!r} round {request.round}")
    if weight:
        problem = weight_problem(reply.config.get("weight"))
        if problem is not None:
            return problem
    if template is not None:
        try:
            tree.check_update(template, reply.tensors, what=what, finite=finite)
        except UpdateError as e:
            return str(e)
    return None
