"""The replicated key-value store under the ledger, and its in-process backend.

The ledger (:mod:`shoal.ledger.ledger`) needs five things of a store, all of which etcd's v3
API gives (:class:`~shoal.ledger.etcd.EtcdStore`) and :class:`MemoryStore` imitates in one
process for simulation and fast tests:

* ``create(key, value)`` — write once: succeeds only if ``key`` was never written (etcd: a
  transaction that requires ``create_revision == 0``), returning the write's revision;
* ``read(prefixes, keys)`` — the records under each prefix and the record of each exact key
  (``None`` where there is none), all read at one revision (etcd: transactions of range
  requests), and that revision; more than ``max_records`` under one prefix is a
  :class:`TooManyRecords`, never a silent truncation. The ledger reads rounds by the exact
  keys of their entries (:mod:`shoal.ledger.keys`): what such a read costs depends on the keys
  asked for, never on how many other keys a writer put under the same prefixes; it ranges
  over a prefix only for the registry (``ranges(prefixes)`` is ``read`` with no exact keys);
* ``list_keys(prefix)`` — the keys under a prefix without their values (etcd: a
  ``keys_only`` range): how an audit finds one device's chain, whatever the values beside it
  weigh, before reading its entry keys with ``read``;
* ``watch_keys(prefix, keys, revision, timeout)`` — block until one of a set of exact keys (all
  under ``prefix``) is written after ``revision`` (etcd: a watch), or the timeout passes, and
  return what was written, so a follower needs no new read. Only writes to those keys wake the
  caller or are kept, so writes to other keys (a hostile writer's junk under its own prefix)
  can neither delay nor evict what the caller waits for;
* revisions: one counter for the whole store, raised by every write, so that "written before"
  is a fact every reader agrees on. A record keeps the revision that created it, the revision
  that last changed it and its ``version`` (1 for a record written once and never changed).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import TransportError

__all__ = ["DEFAULT_MAX_RECORDS", "KeyValueStore", "LedgerAccessError", "MemoryStore", "Record",
           "TooManyRecords"]

DEFAULT_MAX_RECORDS = 10_000
"""The most records a store returns under one prefix (etcd's ``limit``); more is a
:class:`TooManyRecords`."""


class LedgerAccessError(TransportError):
    """The store (etcd's RBAC) refused this device a read or write: the device is not
    enrolled, was revoked, or wrote outside its own prefix. ``device`` and ``key`` name who
    and what."""

    def __init__(self, message: str, *, device: str, key: str):
        super().__init__(message)
        self.device = device
        self.key = key


class TooManyRecords(TransportError):
    """More than ``max_records`` records under ``prefix``: the store refuses to return a
    truncated prefix (a reader that can do without it — an audit of one device among many —
    reports it and goes on)."""

    def __init__(self, prefix: str, limit: int, count: int | None = None):
        said = f" ({count})" if count is not None else ""
        super().__init__(
            f"more than max_records={limit} records under {prefix!r}{said}; the ledger refuses "
            "to read a truncated prefix. Read narrower prefixes or exact keys, or raise "
            "max_records.")
        self.prefix = prefix
        self.limit = limit


@dataclass(frozen=True)
class Record:
    """One key as the store holds it."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int


class KeyValueStore(Protocol):
    """What the ledger needs of its store; see the module docstring."""

    def create(self, key: str, value: bytes) -> int | None:
        """Write ``value`` under ``key`` if the key was never written; its revision, or
        ``None`` when the key exists."""
        ...

    def ranges(self, prefixes: Sequence[str]) -> tuple[list[list[Record]], int]:
        """The records under each prefix (sorted by key), read at one revision, and it."""
        ...

    def read(self, prefixes: Sequence[str], keys: Sequence[str]
             ) -> tuple[list[list[Record]], list[Record | None], int]:
        """The records under each of ``prefixes`` (as :meth:`ranges`) and the record of each
        of ``keys`` (``None`` where the key does not exist), all read at one revision, and
        it."""
        ...

    def list_keys(self, prefix: str) -> tuple[list[str], int]:
        """The keys under ``prefix`` (sorted), without their values, and the revision they
        were read at; more than ``max_records`` is a :class:`TooManyRecords`."""
        ...

    def watch_keys(self, prefix: str, keys: Collection[str], revision: int,
                   timeout: float) -> list[Record]:
        """The records of ``keys`` (exact keys, all under ``prefix``; a key's newest record
        only) modified after ``revision``, in revision order, as soon as there is one; ``[]``
        when ``timeout`` passes first. Writes to any other key neither wake the caller nor are
        kept."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class MemoryStore:
    """A :class:`KeyValueStore` in one process (simulation, tests). ``put`` and ``delete``
    are what an administrator of the real store can do (tests play that insider with them);
    the ledger itself only ever calls ``create``. ``max_records`` bounds :meth:`read` as
    :class:`~shoal.ledger.etcd.EtcdStore`'s does, so that simulation and deployment agree."""

    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        self.max_records = max_records
        self._records: dict[str, Record] = {}
        self._revision = 0
        self._changed = threading.Condition()

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._records)} keys, revision {self._revision})"

    @property
    def revision(self) -> int:
        """The store's current revision."""
        return self._revision

    def _write(self, key: str, value: bytes, *, only_new: bool) -> int | None:
        with self._changed:
            old = self._records.get(key)
            if only_new and old is not None:
                return None
            self._revision += 1
            self._records[key] = Record(
                key, bytes(value), old.create_revision if old else self._revision,
                self._revision, old.version + 1 if old else 1)
            self._changed.notify_all()
            return self._revision

    def create(self, key: str, value: bytes) -> int | None:
        """Write once; see :class:`KeyValueStore`."""
        return self._write(key, value, only_new=True)

    def put(self, key: str, value: bytes) -> int:
        """Overwrite ``key`` (an administrator's power, not the ledger's)."""
        rev = self._write(key, value, only_new=False)
        assert rev is not None
        return rev

    def delete(self, key: str) -> bool:
        """Remove ``key`` (an administrator's power, not the ledger's)."""
        with self._changed:
            if self._records.pop(key, None) is None:
                return False
            self._revision += 1
            self._changed.notify_all()
            return True

    def ranges(self, prefixes: Sequence[str]) -> tuple[list[list[Record]], int]:
        """See :class:`KeyValueStore`."""
        got, _, revision = self.read(prefixes, ())
        return got, revision

    def read(self, prefixes: Sequence[str], keys: Sequence[str]
             ) -> tuple[list[list[Record]], list[Record | None], int]:
        """See :class:`KeyValueStore`."""
        with self._changed:
            got: list[list[Record]] = []
            if prefixes:
                ordered = sorted(self._records)
                for p in prefixes:
                    under = [self._records[k] for k in ordered if k.startswith(p)]
                    if len(under) > self.max_records:
                        raise TooManyRecords(p, self.max_records, len(under))
                    got.append(under)
            return got, [self._records.get(k) for k in keys], self._revision

    def list_keys(self, prefix: str) -> tuple[list[str], int]:
        """See :class:`KeyValueStore`."""
        with self._changed:
            under = sorted(k for k in self._records if k.startswith(prefix))
            if len(under) > self.max_records:
                raise TooManyRecords(prefix, self.max_records, len(under))
            return under, self._revision

    def watch_keys(self, prefix: str, keys: Collection[str], revision: int,
                   timeout: float) -> list[Record]:
        """See :class:`KeyValueStore`: looks at ``keys`` only, however many others there are."""
        wanted = list(dict.fromkeys(keys))
        if any(not k.startswith(prefix) for k in wanted):
            raise ValueError(f"watch_keys: every key must be under {prefix!r}")

        def changed() -> list[Record]:
            got = (self._records.get(k) for k in wanted)
            return sorted((r for r in got if r is not None and r.mod_revision > revision),
                          key=lambda r: r.mod_revision)
        with self._changed:
            self._changed.wait_for(changed, timeout)
            return changed()

    def close(self) -> None:
        """Nothing to release."""
