"""``ArrayData``: the examples one node holds, as rows of shared tensors.

A federation is described by indices into one pool of tensors, not by copies: a client is the
tensor of its row numbers. Memory grows with the data, not with the number of clients, and a
batch is one ``index_select`` (several times faster than indexing ``x[rows]``, which goes
through advanced indexing, for the same copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = ["ArrayData"]


@dataclass(frozen=True, eq=False)
class ArrayData:
    """Rows ``index`` of the tensors ``x`` (features) and ``y`` (targets).

    ``x`` and ``y`` are usually shared by every client of a simulation; ``index`` (int64, shape
    ``(n,)``) says which rows this node holds.
    """

    x: Tensor
    y: Tensor
    index: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"ArrayData: x has {self.x.shape[0]} rows but y has {self.y.shape[0]}; "
                "expected one target per example."
            )
        if self.index.dtype != torch.int64 or self.index.dim() != 1:
            raise DataError(
                f"ArrayData: index must be a 1-D int64 tensor (got {self.index.dtype}, "
                f"{self.index.dim()}-D)."
            )

    @classmethod
    def of(cls, x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> ArrayData:
        """All rows of ``x`` and ``y`` (NumPy arrays are converted without copying)."""
        xt = torch.as_tensor(x)
        yt = torch.as_tensor(y)
        return cls(xt, yt, torch.arange(xt.shape[0], dtype=torch.int64))

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> ArrayData:
        """Materialise a map-style torch ``Dataset`` of ``(x, y)`` pairs into tensors."""
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as e:
            raise DataError(
                "ArrayData.from_dataset: the dataset has no len(); pass a map-style Dataset "
                "whose items are (x, y) pairs."
            ) from e
        if n == 0:
            raise DataError("ArrayData.from_dataset: the dataset is empty.")
        xs, ys = zip(*(dataset[i] for i in range(n)), strict=True)
        return cls.of(torch.stack([torch.as_tensor(v) for v in xs]),
                      torch.stack([torch.as_tensor(v) for v in ys]))

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def subset(self, positions: Tensor | np.ndarray) -> ArrayData:
        """The examples at ``positions`` (positions within this node's rows, not raw rows)."""
        pos = torch.as_tensor(positions, dtype=torch.int64)
        return ArrayData(self.x, self.y, self.index[pos])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """This node's examples as two new tensors ``(x, y)``."""
        return self.x.index_select(0, self.index), self.y.index_select(0, self.index)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                *, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Mini-batches of ``(x, y)``; shuffled with ``generator`` when one is given.

        Unshuffled batches of rows that lie next to each other in the pool (a test set, say)
        are views of the pool, not copies: treat them as read-only."""
        first = self._first_row_if_consecutive() if generator is None else None
        if first is not None:
            n = len(self)
            stop = n - n % batch_size if drop_last else n
            for start in range(first, first + stop, batch_size):
                end = min(start + batch_size, first + stop)
                yield self.x[start:end], self.y[start:end]
            return
        for sel in self.batch_rows(batch_size, generator, drop_last=drop_last):
            yield self.x.index_select(0, sel), self.y.index_select(0, sel)

    def _first_row_if_consecutive(self) -> int | None:
        """``index[0]`` when ``index`` is ``index[0], index[0] + 1, ...``; else ``None``."""
        idx = self.index
        if len(idx) == 0:
            return None
        first = int(idx[0])
        if int(idx[-1]) - first != len(idx) - 1 or (len(idx) > 1 and not bool(
                (idx[1:] - idx[:-1] == 1).all())):
            return None
        return first

    def batch_rows(self, batch_size: int, generator: torch.Generator | None = None,
                   *, drop_last: bool = False) -> Iterator[Tensor]:
        """The row numbers of each mini-batch :meth:`batches` yields (same order, same draws)."""
        n = len(self)
        rows = self.index if generator is None else self.index[torch.randperm(n, generator=generator)]
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield rows[start:start + batch_size]
