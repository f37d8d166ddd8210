"""Collecting a round's train replies: validate each, run the coordinator-side stages, reduce.

``RoundFold`` is what FedAvg does with the replies of one round, cut so that it can run in
parts: each part (a worker process of an executor, or the coordinator itself) folds the replies
it computed into a :class:`Partial`; the parts are merged and finished once. With a reducer that
can be computed from running sums (``linear`` and ``finalize``, e.g. ``weighted_mean()``) a
part holds only its running sum ``sum(w_i * x_i)``; otherwise it keeps its individual updates,
which the merge puts back in cohort order before the reducer sees them.

Folding every reply in one part, in cohort order, does exactly the arithmetic of
``Pipeline.reduce`` (bit for bit); merging parts adds the running sums in another order, which
changes the last bits of the float sums. So does folding the replies of an executor that trains
clients as rows of stacked tensors (``rows`` of :meth:`RoundFold.fold`): their finiteness
checks and weighted sum take one reduction per stacked tensor, not one per client.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import tree
from ..aggregate import Pipeline
from ..errors import UpdateError
from ..message import Message
from ..tree import Params
from ..types import ClientInfo

__all__ = ["Partial", "RoundFold", "RowsOf", "invalid_reply"]

log = logging.getLogger(__name__)


def invalid_reply(request: Message, reply: Message, params: Params, *,
                  finite: bool = True) -> str | None:
    """Why ``reply`` cannot be used as a train update for ``request``, or ``None`` if it can:
    checks the error, sender, round, kind, weight (finite, > 0) and the update's names, shapes,
    dtypes and (unless ``finite`` is false) finiteness against ``params``."""
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
        tree.check_update(params, reply.tensors, finite=finite)
    except UpdateError as e:
        return str(e)
    return None


RowsOf = Callable[[Message], "tuple[Params, int] | None"]
"""``rows(reply) -> (stacks, j)`` when every tensor of the reply's update is row ``j`` of the
stacked tensor of the same name (``(C, *shape)``), else ``None`` (see :meth:`RoundFold.fold`)."""


def _weighted_rows(stack: Tensor, rows: list[int], weights: list[float]) -> Tensor:
    """``sum_i weights[i] * stack[rows[i]]`` as a new contiguous tensor of one row's shape."""
    c = stack.shape[0]
    rows, weights = (list(t) for t in zip(*sorted(zip(rows, weights, strict=True)), strict=True))
    # View the stack in its memory order, so the rows are one (C, numel) matrix, no copy.
    inner = sorted(range(1, stack.dim()), key=lambda d: -stack.stride()[d])
    mem = stack.permute(0, *inner)
    matrix = mem.reshape(c, -1)  # a view when the stack is dense (as the trainer makes it)
    if rows != list(range(c)):
        matrix = matrix[rows]
    w = torch.tensor(weights, dtype=stack.dtype)
    flat = w @ matrix  # (numel,)
    back = [inner.index(d) for d in range(1, stack.dim())]
    return flat.view(mem.shape[1:]).permute(back).contiguous()


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
             positions: Sequence[int] | None = None, rows: RowsOf | None = None) -> Partial:
        """Fold replies as they come (one update held at a time when the reducer streams).

        ``rows`` (from an executor that trains clients as rows of stacked tensors) gives, for
        a reply whose update tensors are all rows ``j`` of stacks ``(C, *shape)``,
        ``(stacks, j)``: such replies are checked for finiteness and summed with one
        reduction per stacked tensor instead of one per client (when the reducer streams and
        no stage runs at the coordinator); the result equals :meth:`add`'s up to float
        rounding (another order of the same additions)."""
        part = self.start()
        pos = range(len(requests)) if positions is None else positions
        if not self.streams or any(st.runs_at == "coordinator" for st in self.pipeline.stages):
            rows = None
        stacked: list[tuple[int, Message, Message, Params, int]] = []
        for p, req, rep in zip(pos, requests, replies, strict=True):
            hit = rows(rep) if rows is not None else None
            if hit is None:
                self.add(part, p, req, rep)
            else:
                stacked.append((p, req, rep, *hit))
        groups: dict[int, list[tuple[int, Message, Message, Params, int]]] = {}
        for item in stacked:
            groups.setdefault(id(item[3]), []).append(item)
        for group in groups.values():
            self._add_rows(part, group)
        return part

    def _add_rows(self, part: Partial, items: list[tuple[int, Message, Message, Params, int]],
                  ) -> None:
        """Fold replies whose updates are rows of the same stacks (see :meth:`fold`)."""
        stacks = items[0][3]
        reasons: list[str | None] = [invalid_reply(req, rep, self.reference, finite=False)
                                     for _, req, rep, _, _ in items]
        weight = [float(rep.config["weight"]) if r is None else 0.0
                  for (_, _, rep, _, _), r in zip(items, reasons, strict=True)]
        client_weight = self.pipeline.reducer.client_weight  # type: ignore[attr-defined]
        w = [client_weight(x) if r is None else 0.0 for x, r in zip(weight, reasons, strict=True)]

        def total() -> Params:
            kept = [(item[4], wi) for item, r, wi in zip(items, reasons, w, strict=True)
                    if r is None]
            return {k: _weighted_rows(t, [j for j, _ in kept], [wi for _, wi in kept])
                    for k, t in stacks.items()}

        if all(r is not None for r in reasons):
            summed = None
        else:
            # A weighted sum with weights > 0 is finite only if every row is (a NaN or inf
            # spreads), so one pass checks them all; only a non-finite sum (a bad row, or an
            # overflow) needs the exact check of each row, and a second sum without the bad.
            summed = total()
            if not tree.is_finite(summed):
                for i, (_, _, rep, _, _) in enumerate(items):
                    if reasons[i] is None:
                        try:
                            for k, t in rep.tensors.items():
                                if t.is_floating_point():
                                    tree.check_finite(k, t)
                        except UpdateError as e:
                            reasons[i] = str(e)
                summed = total() if any(r is None for r in reasons) else None
        for (position, request, reply, _, _), reason, x, wi in zip(items, reasons, weight, w,
                                                                  strict=True):
            if reason is not None:
                part.dropped.append((position, request.dst, reason))
                continue
            part.positions.append(position)
            part.metrics.append({**reply.metrics, "weight": x})
            part.weights.append(wi)
        if summed is None:
            return
        if part.running_sum is None:
            part.running_sum = summed
        else:
            tree.add_(part.running_sum, summed)

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
