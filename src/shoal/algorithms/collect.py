"""Collecting a round's train replies: validate each, run the coordinator-side stages, reduce.

``RoundFold`` is what FedAvg does with the replies of one round, cut so that it can run in
parts: each part (a worker process of an executor, or the coordinator itself) folds the replies
it computed into a :class:`Partial`; the parts are merged and finished once. With a reducer that
can be computed from running sums (``linear`` and ``finalize``, e.g. ``weighted_mean()``) a
part holds only its running sum ``sum(w_i * x_i)``; otherwise it keeps its individual updates,
which the merge puts back in cohort order before the reducer sees them.

Folding every reply in one part, in cohort order, does exactly the arithmetic of
``Pipeline.reduce`` (bit for bit); merging parts adds the running sums in another order, which
changes the last bits of the float sums.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import tree
from ..aggregate import Pipeline
from ..errors import UpdateError
from ..message import Message
from ..tree import Params
from ..types import ClientInfo

__all__ = ["Partial", "RoundFold", "invalid_reply"]

log = logging.getLogger(__name__)


def invalid_reply(request: Message, reply: Message, params: Params) -> str | None:
    """Why ``reply`` cannot be used as a train update for ``request``, or ``None`` if it can:
    checks the error, sender, round, kind, weight (finite, > 0) and the update's names, shapes,
    dtypes and finiteness against ``params``."""
    if reply.error is not None:
        return reply.error
    if reply.src != request.dst:
        return f"reply from {reply.src!r} answers a request sent to {request.dst!r}"
    if reply.round != request.round or reply.kind != request.kind:
        return (f"reply is for {reply.kind!r} round {reply.round}, "
                f"expected {request.kind!r} round {request.round}")
    weight = reply.config.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float) \
            or not math.isfinite(weight) or weight <= 0:
        return f"weight must be a finite number > 0, got {weight!r}"
    try:
        tree.check_update(params, reply.tensors)
    except UpdateError as e:
        return str(e)
    return None


@dataclass
class Partial:
    """The folded replies of one part of a cohort.

    ``positions`` are the cohort positions of the valid replies, with their reducer ``weights``
    and client ``metrics`` (same order); ``running_sum`` is ``sum(w_i * x_i)`` (streaming
    reducers) and ``updates`` the individual updates (other reducers); ``dropped`` maps
    ``(position, node id)`` to the reason.
    """

    positions: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    running_sum: Params | None = None
    updates: list[Params] = field(default_factory=list)
    dropped: list[tuple[int, str, str]] = field(default_factory=list)


class RoundFold:
    """Folds one round's train replies; see the module docstring.

    ``params`` are the global params the requests carried; ``configs`` the stages' client
    configs of the round.
    """

    def __init__(self, pipeline: Pipeline, params: Params, configs: Sequence[Mapping[str, Any]],
                 round: int, seed: int):
        self.pipeline = pipeline
        self.params = params
        self.reference = pipeline.update_template(params)  # what a reply must hold
        self.configs = list(configs)
        self.round = round
        self.seed = seed
        reducer = pipeline.reducer
        self.streams = bool(reducer.linear) and hasattr(reducer, "finalize") \
            and hasattr(reducer, "client_weight")

    def start(self) -> Partial:
        """An empty part."""
        return Partial()

    def add(self, part: Partial, position: int, request: Message, reply: Message) -> None:
        """Fold the reply to the request at cohort ``position`` into ``part``."""
        reason = invalid_reply(request, reply, self.reference)
        if reason is not None:
            part.dropped.append((position, request.dst, reason))
            return
        update = reply.tensors
        for i, s in enumerate(self.pipeline.stages):
            if s.runs_at == "coordinator":
                update = s.client(update, self.configs[i],
                                  ClientInfo(request.dst, self.round, self.seed))
        weight = float(reply.config["weight"])
        part.positions.append(position)
        part.metrics.append({**reply.metrics, "weight": weight})
        if self.streams:
            w = self.pipeline.reducer.client_weight(weight)  # type: ignore[attr-defined]
            if part.running_sum is None:
                part.running_sum = {k: v * w for k, v in update.items()}
            else:
                tree.add_(part.running_sum, update, alpha=w)
            part.weights.append(w)
        else:
            part.updates.append(update)
            part.weights.append(weight)

    def fold(self, requests: Sequence[Message], replies: Iterable[Message],
             positions: Sequence[int] | None = None) -> Partial:
        """Fold replies as they come (one update held at a time when the reducer streams)."""
        part = self.start()
        pos = range(len(requests)) if positions is None else positions
        for p, req, rep in zip(pos, requests, replies, strict=True):
            self.add(part, p, req, rep)
        return part

    def merge(self, parts: Sequence[Partial]) -> Partial:
        """One part from several: running sums added in the order given, everything else put
        back in cohort order."""
        out = Partial()
        for p in parts:
            if p.running_sum is not None:
                if out.running_sum is None:
                    out.running_sum = tree.clone(p.running_sum)
                else:
                    tree.add_(out.running_sum, p.running_sum)
        rows = sorted((pos, i, j) for i, p in enumerate(parts) for j, pos in enumerate(p.positions))
        for pos, i, j in rows:
            out.positions.append(pos)
            out.weights.append(parts[i].weights[j])
            out.metrics.append(parts[i].metrics[j])
            if not self.streams:
                out.updates.append(parts[i].updates[j])
        out.dropped = sorted(d for p in parts for d in p.dropped)
        return out

    def finish(self, part: Partial) -> tuple[Params | None, int]:
        """``(reduced, count)``; ``reduced`` is ``None`` when fewer updates than the reducer's
        ``min_updates`` are valid."""
        reducer = self.pipeline.reducer
        count = len(part.positions)
        if count == 0 or count < reducer.min_updates:
            return None, count
        if self.streams:
            assert part.running_sum is not None
            return reducer.finalize(part.running_sum, math.fsum(part.weights)), count  # type: ignore[attr-defined]
        return reducer.reduce_stream(zip(part.updates, part.weights, strict=True))
