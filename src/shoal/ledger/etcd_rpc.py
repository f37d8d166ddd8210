"""etcd's gRPC as the ledger's etcd modules use it: one member's stubs, the metadata that makes
a member without a leader refuse, key ranges, records, and the error of a refusal by RBAC.

Shared by :mod:`shoal.ledger.etcd` (:class:`~shoal.ledger.etcd.EtcdStore`: connections,
fail-over, writes and reads), :mod:`shoal.ledger.etcd_watch` (its watch streams) and
:mod:`shoal.ledger.etcd_access` (users and roles); it depends on none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from .store import LedgerAccessError, Record

__all__ = ["REQUIRE_LEADER", "LedgerAccessError", "Member", "prefix_end", "to_record"]

REQUIRE_LEADER = (("hasleader", "true"),)
"""gRPC metadata on every request: a member without a leader refuses it (the store fails over
to another member)."""


@dataclass
class Member:
    """The channel to one etcd member and the stubs on it."""

    endpoint: str
    channel: grpc.Channel
    kv: Any
    watch: Any
    auth: Any


def prefix_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` for every key starting with ``prefix``: the prefix with its last
    byte below 0xff raised by one (``b"\\0"``, every key, for the empty prefix)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"
    p[-1] += 1
    return bytes(p)


def to_record(kv: Any) -> Record:
    """A store record from etcd's ``mvccpb.KeyValue``. A key that is not UTF-8 (a device may
    write any bytes under its prefix) is decoded with U+FFFD in place of the bad bytes: it is
    no entry key then, and is counted as junk rather than failing the read."""
    return Record(kv.key.decode(errors="replace"), bytes(kv.value), int(kv.create_revision),
                  int(kv.mod_revision), int(kv.version))
