"""``ClientIds``: the ids of a numbered population, computed on demand.

A population of a million simulated clients must not cost a million Python strings: the ids of
numbered partitions are ``client-0``, ``client-1``, ... zero-padded to one width (so sorting the
names sorts the clients), and :class:`ClientIds` is that sequence — its length, the prefix and
the width — answering ``ids[i]``, ``ids.index(cid)`` and ``cid in ids`` by arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

from ..errors import DataError

__all__ = ["ClientIds", "as_ids"]


class ClientIds(Sequence[str]):
    """The ``n`` ids ``f"{prefix}{i:0{width}d}"``, ``i = 0 .. n - 1`` (``width``: the digits of
    ``n - 1``), without storing them."""

    def __init__(self, n: int, prefix: str = "client-", width: int | None = None):
        if n < 0:
            raise DataError(f"ClientIds: n must be >= 0 (got {n}).")
        self.n = int(n)
        self.prefix = prefix
        self.width = len(str(max(self.n - 1, 0))) if width is None else int(width)

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"ClientIds: index {i} out of range for {self.n} ids")
        return f"{self.prefix}{i:0{self.width}d}"

    def __iter__(self) -> Iterator[str]:
        return (f"{self.prefix}{i:0{self.width}d}" for i in range(self.n))

    def position(self, cid: object) -> int | None:
        """The index of ``cid``, or ``None`` if it is not one of these ids."""
        if not isinstance(cid, str) or not cid.startswith(self.prefix):
            return None
        digits = cid[len(self.prefix):]
        if len(digits) != self.width or not digits.isdigit():
            return None
        i = int(digits)
        return i if i < self.n else None

    def __contains__(self, cid: object) -> bool:
        return self.position(cid) is not None

    def index(self, cid: Any, start: int = 0, stop: int | None = None) -> int:
        """The index of ``cid`` (``ValueError`` if it is not one of these ids)."""
        i = self.position(cid)
        if i is None or i < start or (stop is not None and i >= stop):
            raise ValueError(f"{cid!r} is not in {self!r}")
        return i

    def count(self, cid: Any) -> int:
        """1 if ``cid`` is one of these ids, else 0."""
        return int(cid in self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClientIds):
            return (self.n, self.prefix, self.width) == (other.n, other.prefix, other.width)
        if isinstance(other, list | tuple):
            return len(other) == self.n and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.n, self.prefix, self.width))

    def __repr__(self) -> str:
        if self.n == 0:
            return "ClientIds(0)"
        return f"ClientIds({self.n}: {self[0]!r} .. {self[self.n - 1]!r})"


def as_ids(ids: Sequence[str]) -> Sequence[str]:
    """``ids`` as an immutable sequence: a :class:`ClientIds` as it is, anything else as a
    tuple."""
    return ids if isinstance(ids, ClientIds | tuple) else tuple(ids)
