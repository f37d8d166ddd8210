"""Collecting a round's train replies: validate each, run the coordinator-side stages, fold.

``RoundFold`` is what FedAvg (and every algorithm built on it) does with the replies of one
round, cut so that it can run in parts: each part (a worker process of an executor, or the
coordinator itself) folds the replies it computed into a :class:`Partial`; the parts are merged
and finished once. A reply is checked by :func:`~shoal.validation.reply_problem` against the
round's *update template* — the model's params, every stage's extra tensors and the extra
tensors of the algorithm's own channels — then its model update goes through the
coordinator-side stages into the pipeline's :class:`~shoal.aggregate.Fold`, and each extra
channel into a fold of its own (SCAFFOLD's control-variate updates are averaged uniformly,
whatever the pipeline does with the model update).

Folding every reply in one part, in cohort order, does exactly the arithmetic of
``Pipeline.reduce`` (bit for bit); merging parts adds the running sums in another order, which
changes the last bits of the float sums. So does folding the replies of an executor that trains
clients as rows of stacked tensors (``rows`` of :meth:`RoundFold.fold`): their finiteness
checks and weighted sums take one reduction per stacked tensor, not one per client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import tree
from ..aggregate import Fold, Pipeline, Reducer
from ..errors import UpdateError
from ..message import Message
from ..tree import Params
from ..types import ClientInfo
from ..validation import reply_problem
from .influence import WeightCap, client_metrics

__all__ = ["UPDATE", "Channel", "Partial", "RoundFold", "RowsOf"]

log = logging.getLogger(__name__)

UPDATE = "update"
"""The name of the channel that carries the model update (through the pipeline)."""

RowsOf = Callable[[Message], "tuple[Params, int] | None"]
"""``rows(reply) -> (stacks, j)`` when every tensor of the reply is row ``j`` of the stacked
tensor of the same name (``(C, *shape)``), else ``None`` (see :meth:`RoundFold.fold`)."""


@dataclass(frozen=True)
class Channel:
    """Tensors of a reply folded apart from the model update: ``template`` names them (with
    their shapes and dtypes), ``reducer`` reduces them (a linear one)."""

    template: Params
    reducer: Reducer


@dataclass
class Partial:
    """The folded replies of one part of a cohort.

    ``folds`` has one :class:`~shoal.aggregate.Fold` per channel (:data:`UPDATE` first);
    ``positions`` are the cohort positions of the valid replies with their client ``metrics``
    (plus the ``"weight"`` used), in the same order; ``dropped`` holds ``(position, node id,
    reason)`` of every reply that was not used; ``capped`` counts the weights clipped to their
    cap and ``refused`` the metric keys refused (:mod:`shoal.algorithms.influence`).
    """

    folds: dict[str, Fold]
    positions: list[int] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    dropped: list[tuple[int, str, str]] = field(default_factory=list)
    capped: int = 0
    refused: int = 0

    @property
    def fold(self) -> Fold:
        """The model update's fold."""
        return self.folds[UPDATE]


class RoundFold:
    """Folds one round's train replies; see the module docstring.

    ``params`` are the global params the requests carried; ``configs`` the stages' client
    configs of the round; ``channels`` the algorithm's extra channels by name; ``weight_cap``
    the most weight a reply counts with (``None``: its claim, unchecked).
    """

    def __init__(self, pipeline: Pipeline, params: Params, configs: Sequence[Mapping[str, Any]],
                 round: int, seed: int, channels: Mapping[str, Channel] | None = None,
                 weight_cap: WeightCap | None = None):
        self.pipeline = pipeline
        self.template = pipeline.update_template(params)  # the model update's tensors
        self.channels = dict(channels or {})
        self.reference: Params = dict(self.template)  # what a reply must hold, in all
        for c in self.channels.values():
            self.reference.update(c.template)
        self.configs = list(configs)
        self.round = round
        self.seed = seed
        self._coordinator_stages = any(s.runs_at == "coordinator" for s in pipeline.stages)
        self.weight_cap = weight_cap

    def _weight(self, part: Partial, reply: Message) -> float:
        """The weight ``reply`` counts with (its claim, clipped to its cap)."""
        weight = float(reply.config["weight"])
        if self.weight_cap is None:
            return weight
        used, clipped = self.weight_cap.clip(reply.src, weight)
        part.capped += clipped
        return used

    def _record(self, part: Partial, position: int, reply: Message, weight: float) -> None:
        """Note a used reply: its position and the metrics the coordinator keeps of it."""
        cap = None if self.weight_cap is None else self.weight_cap.cap(reply.src)
        kept, refused = client_metrics(reply.metrics, cap)
        part.refused += refused
        part.positions.append(position)
        part.metrics.append({**kept, "weight": weight})

    @property
    def streams(self) -> bool:
        """Whether every fold keeps only running sums (linear reducers)."""
        return self.pipeline.reducer.linear and all(c.reducer.linear
                                                    for c in self.channels.values())

    def start(self) -> Partial:
        """An empty part (every fold allocated from its template)."""
        folds = {UPDATE: self.pipeline.fold(self.template)}
        for name, c in self.channels.items():
            folds[name] = Fold(c.reducer, c.template)
        return Partial(folds)

    def _split(self, tensors: Params) -> dict[str, Params]:
        out = {UPDATE: {k: tensors[k] for k in self.template}}
        for name, c in self.channels.items():
            out[name] = {k: tensors[k] for k in c.template}
        return out

    def add(self, part: Partial, position: int, request: Message, reply: Message) -> None:
        """Fold the reply to the request at cohort ``position`` into ``part``."""
        reason = reply_problem(request, reply, template=self.reference, weight=True)
        if reason is not None:
            part.dropped.append((position, request.dst, reason))
            return
        weight = self._weight(part, reply)
        pieces = self._split(reply.tensors)
        if self._coordinator_stages:
            pieces[UPDATE] = self.pipeline.coordinator(
                pieces[UPDATE], self.configs, ClientInfo(request.dst, self.round, self.seed))
        for name, piece in pieces.items():
            part.folds[name].add(piece, weight, position)
        self._record(part, position, reply, weight)

    def fold(self, requests: Sequence[Message], replies: Iterable[Message],
             positions: Sequence[int] | None = None, rows: RowsOf | None = None) -> Partial:
        """Fold replies as they come (one update held at a time when the reducers stream).

        ``rows`` (from an executor that trains clients as rows of stacked tensors) gives, for
        a reply whose tensors are all rows ``j`` of stacks ``(C, *shape)``, ``(stacks, j)``:
        such replies are checked for finiteness and summed with one reduction per stacked
        tensor instead of one per client (when the reducers stream and no stage runs at the
        coordinator); the result equals :meth:`add`'s up to float rounding (another order of
        the same additions)."""
        part = self.start()
        pos = range(len(requests)) if positions is None else positions
        if not self.streams or self._coordinator_stages:
            rows = None
        stacked: list[tuple[int, Message, Message, Params, int]] = []
        for p, req, rep in zip(pos, requests, replies, strict=True):
            hit = rows(rep) if rows is not None else None
            if hit is None or hit[0].keys() != self.reference.keys():
                self.add(part, p, req, rep)
            else:
                stacked.append((p, req, rep, *hit))
        groups: dict[int, list[tuple[int, Message, Message, Params, int]]] = {}
        for item in stacked:
            groups.setdefault(id(item[3]), []).append(item)
        for group in groups.values():
            self._add_rows(part, group)
        return part

    def _rows_fold(self, stacks: Params, rows: list[int], weights: list[float],
                   positions: list[int]) -> Partial:
        tmp = self.start()
        for name, piece in self._split(stacks).items():
            tmp.folds[name].add_rows(piece, rows, weights, positions)
        return tmp

    def _add_rows(self, part: Partial, items: list[tuple[int, Message, Message, Params, int]],
                  ) -> None:
        """Fold replies whose tensors are rows of the same stacks (see :meth:`fold`)."""
        stacks = items[0][3]
        reasons: list[str | None] = [
            reply_problem(req, rep, template=self.reference, weight=True, finite=False)
            for _, req, rep, _, _ in items]

        used = [self._weight(part, rep) if r is None else 0.0
                for (_, _, rep, _, _), r in zip(items, reasons, strict=True)]

        def kept() -> Partial | None:
            ok = [(item, w) for item, r, w in zip(items, reasons, used, strict=True)
                  if r is None]
            if not ok:
                return None
            return self._rows_fold(stacks, [it[4] for it, _ in ok], [w for _, w in ok],
                                   [it[0] for it, _ in ok])

        # A weighted sum with weights > 0 is finite only if every row is (a NaN or inf spreads),
        # so one pass checks them all; only a non-finite sum (a bad row, or an overflow) needs
        # the exact check of each row, and a second sum without the bad ones.
        tmp = kept()
        if tmp is not None and not all(f.is_finite() for f in tmp.folds.values()):
            for i, (_, _, rep, _, _) in enumerate(items):
                if reasons[i] is None:
                    try:
                        for k, t in rep.tensors.items():
                            if t.is_floating_point():
                                tree.check_finite(k, t)
                    except UpdateError as e:
                        reasons[i] = str(e)
            tmp = kept()
        for (position, request, _, _, _), reason in zip(items, reasons, strict=True):
            if reason is not None:
                part.dropped.append((position, request.dst, reason))
        if tmp is None:
            return
        for name, f in tmp.folds.items():
            part.folds[name].merge(f)
        for (position, _, reply, _, _), reason, w in zip(items, reasons, used, strict=True):
            if reason is None:
                self._record(part, position, reply, w)

    def merge(self, parts: Sequence[Partial]) -> Partial:
        """One part from several: running sums added in the order given, everything else put
        back in cohort order."""
        out = self.start()
        for p in parts:
            for name, f in p.folds.items():
                out.folds[name].merge(f)
        rows = sorted((pos, i, j) for i, p in enumerate(parts) for j, pos in enumerate(p.positions))
        for pos, i, j in rows:
            out.positions.append(pos)
            out.metrics.append(parts[i].metrics[j])
        out.dropped = sorted(d for p in parts for d in p.dropped)
        out.capped = sum(p.capped for p in parts)
        out.refused = sum(p.refused for p in parts)
        return out

    def finish(self, part: Partial, channel: str = UPDATE) -> tuple[Params | None, int]:
        """``(reduced, count)`` of a channel (default: the model update); ``reduced`` is
        ``None`` when fewer updates than the reducer's ``min_updates`` are valid."""
        return part.folds[channel].finish()
