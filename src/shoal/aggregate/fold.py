"""``Fold``: the one way updates become an aggregate — start, add, merge, finish.

    fold = Fold(reducer, template)          # template: names, shapes, dtypes of one update
    fold.add(update, weight, position)      # as replies arrive, one update held at a time
    fold.merge(other)                       # partial folds of worker processes or peers
    reduced, count = fold.finish()

A *linear* reducer (``weighted_mean()``) keeps only the running sum ``sum(w_i * x_i)`` and
``sum(w_i)``; the sum is allocated from the template up front (zeros), so every partial fold has
the same tensors whether or not it saw an update — a worker that trained no client adds zeros.
A reducer that needs every update (median, trimmed mean, Krum) keeps them, with their cohort
positions, and :meth:`Fold.merge` puts them back in cohort order before the reducer sees them.

Folding updates one after the other does the arithmetic of the classic loop bit for bit (the
first update is multiplied by its weight, the next ones added with theirs); merging parts adds
the running sums in another order, and :meth:`Fold.add_rows` (updates that are rows of stacked
tensors, from a batched executor) takes one reduction per tensor: both change the last bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import tree
from ..errors import AggregationError
from ..tree import Params
from .reducers import Reducer

__all__ = ["Fold"]


def _weighted_rows(stack: Tensor, rows: Sequence[int], weights: Sequence[float]) -> Tensor:
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


class Fold:
    """Updates of one round folded into what ``reducer`` needs; see the module docstring.

    ``positions`` and ``weights`` are those of the updates added (``weights`` after the
    reducer's :meth:`~shoal.aggregate.Reducer.client_weight`); ``sum`` is the running weighted
    sum (linear reducers, template-shaped), ``updates`` the kept updates (other reducers).
    """

    def __init__(self, reducer: Reducer, template: Params):
        self.reducer = reducer
        self.linear = reducer.linear
        self.positions: list[int] = []
        self.weights: list[float] = []
        self.updates: list[Params] = []
        self.sum: Params = ({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in template.items()}
                            if self.linear else {})
        self._started = False  # whether the running sum holds an update yet

    def __repr__(self) -> str:
        return f"Fold({self.reducer!r}, {len(self.positions)} updates)"

    @property
    def count(self) -> int:
        """How many updates were folded."""
        return len(self.positions)

    def add(self, update: Params, weight: float, position: int | None = None) -> None:
        """Fold one update with the weight its client reported (``position``: its place in the
        cohort; default the next)."""
        position = self.count if position is None else position
        if self.linear:
            w = self.reducer.client_weight(weight)
            if self._started:
                tree.add_(self.sum, update, alpha=w)
            else:
                for k, v in self.sum.items():
                    torch.mul(update[k], w, out=v)
                self._started = True
            self.weights.append(w)
        else:
            self.updates.append(update)
            self.weights.append(weight)
        self.positions.append(position)

    def add_rows(self, stacks: Params, rows: Sequence[int], weights: Sequence[float],
                 positions: Sequence[int]) -> None:
        """Fold the updates that are rows ``rows`` of ``stacks`` (``(C, *shape)``) in one
        reduction per tensor (linear reducers) or one by one (others)."""
        if not rows:
            return
        if not self.linear:
            for j, w, p in zip(rows, weights, positions, strict=True):
                self.add({k: t[j] for k, t in stacks.items()}, w, p)
            return
        ws = [self.reducer.client_weight(w) for w in weights]
        for k, t in stacks.items():
            part = _weighted_rows(t, rows, ws)
            if self._started:
                self.sum[k].add_(part)
            else:
                self.sum[k].copy_(part)
        self._started = True
        self.weights += ws
        self.positions += list(positions)

    def add_sum(self, weighted_sum: Params, total_weight: float, count: int) -> None:
        """Fold a sum computed elsewhere — ``sum(w_i * x_i)`` of ``count`` updates whose
        reducer weights total ``total_weight`` (secure aggregation's unmasked sum). Linear
        reducers only."""
        if not self.linear:
            raise AggregationError(f"{self.reducer!r} needs individual updates; a sum of "
                                   f"{count} updates cannot be folded into it.")
        for k, v in self.sum.items():
            src = weighted_sum[k].to(v.dtype)
            v.copy_(src) if not self._started else v.add_(src)
        self._started = True
        # One weight entry per update, so finish() sees the count and the total.
        self.weights += [total_weight] + [0.0] * (count - 1)
        self.positions += list(range(self.count, self.count + count))

    def detach_sum(self) -> Params:
        """Take the running sum out (an executor reduces the parts' sums itself, then
        :meth:`attach_sum` s the total to the merged fold)."""
        out, self.sum, self._started = self.sum, {}, False
        return out

    def attach_sum(self, total: Params) -> None:
        """Set the running sum to ``total`` (the sum of every part's, see :meth:`detach_sum`)."""
        self.sum = total
        self._started = self.count > 0

    def is_finite(self) -> bool:
        """Whether the running sum is finite (every update in it was, and it did not overflow)."""
        return tree.is_finite(self.sum)

    def merge(self, other: Fold) -> None:
        """Add another part's updates: running sums added, kept updates put in cohort order."""
        if other.linear != self.linear:
            raise AggregationError("Fold.merge: the parts fold for different reducers.")
        if self.linear:
            if other._started:
                if self._started:
                    tree.add_(self.sum, other.sum)
                else:
                    for k, v in self.sum.items():
                        v.copy_(other.sum[k])
                    self._started = True
            self.weights += other.weights
            self.positions += other.positions
            return
        rows = sorted(zip(self.positions + other.positions, self.weights + other.weights,
                          self.updates + other.updates, strict=True), key=lambda r: r[0])
        self.positions = [r[0] for r in rows]
        self.weights = [r[1] for r in rows]
        self.updates = [r[2] for r in rows]

    def finish(self) -> tuple[Params | None, int]:
        """``(reduced, count)``; ``reduced`` is ``None`` when fewer updates than the reducer's
        ``min_updates`` were folded."""
        count = self.count
        if count == 0 or count < self.reducer.min_updates:
            return None, count
        if self.linear:
            return self.reducer.finalize(self.sum, math.fsum(self.weights)), count
        return self.reducer(self.updates, self.weights), count
