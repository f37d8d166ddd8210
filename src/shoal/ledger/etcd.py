"""The ledger's store in deployment: an etcd cluster, reached over mutual TLS.

Why etcd: its v3 API gives exactly what :class:`~shoal.ledger.store.KeyValueStore` asks for —
write-once creates (a transaction comparing ``create_revision`` with 0), reads of several
prefixes and keys at one revision (transactions of range requests), watches from a revision,
and a single revision counter that Raft replicates across the members. Why mutual TLS and no
passwords: with ``--client-cert-auth`` and auth enabled, etcd takes the common name (CN) of
the client's certificate as its user name (over gRPC), so the certificate the project's CA
issued a device *is* its ledger account; the per-device role that
:mod:`shoal.ledger.enroll` grants decides what it may read and write.

We talk to etcd through the generated gRPC stubs of ``aetcd`` only (its client class opens
insecure channels), over our own ``grpc.secure_channel``. The etcd side is four modules:

* this one, :class:`EtcdStore` — the :class:`~shoal.ledger.store.KeyValueStore` on a cluster:
  connections, fail-over between the members, ``create``/``read``/``ranges``/``watch_keys``,
  an administrator's ``put``/``delete``;
* :mod:`shoal.ledger.etcd_watch` — the watch streams :meth:`EtcdStore.watch_keys` waits on;
* :mod:`shoal.ledger.etcd_access` — :class:`~shoal.ledger.etcd_access.EtcdAccess`, users and
  roles (enrollment) and the RBAC bootstrap of a fresh cluster (:meth:`EtcdStore.access`);
  :class:`~shoal.ledger.cluster.EtcdCluster` starts a local cluster;
* :mod:`shoal.ledger.etcd_rpc` — what they share: a member's stubs, :func:`prefix_end`, records,
  :class:`LedgerAccessError`.

:class:`EtcdAccess`, :data:`ROLE_PREFIX`, :class:`LedgerAccessError` and :func:`prefix_end`
are re-exported here, so ``from shoal.ledger.etcd import ...`` of them keeps working.

Bounds: a read returns at most ``max_records`` records per prefix (etcd's ``limit``; more is a
:class:`~shoal.ledger.store.TooManyRecords` naming the prefix, never a silent truncation) and at
most ``max_read_bytes`` in one response (gRPC's ``max_receive_message_length``), so a hostile or
broken member cannot exhaust a reader's memory. etcd itself refuses writes over its
``--max-request-bytes`` (1.5 MiB by default).

What the ledger reads is bounded by what it asks for, not by what others wrote: a round is read
by the exact keys of its entries (:meth:`EtcdStore.read`: one get per key, :data:`MAX_TXN_OPS`
per transaction and at most :data:`MAX_TXN_KEYS` keys, so that even keys holding values near
etcd's request limit cannot make one answer exceed ``max_read_bytes``; every transaction at
the first one's revision), and followed by
:meth:`EtcdStore.watch_keys`, whose stream keeps only the newest record of the keys somebody
waits for. A device that writes a flood of other keys under its own prefix (which etcd's RBAC
lets it do) costs a reader nothing but the watch events that stream past.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

from ..errors import ConfigError, TransportError
from ..net.ca import Identity, peer_identity
from .etcd_access import ROLE_PREFIX, EtcdAccess
from .etcd_rpc import REQUIRE_LEADER, LedgerAccessError, Member, prefix_end, to_record
from .etcd_watch import KeyStream
from .store import DEFAULT_MAX_RECORDS, Record, TooManyRecords

__all__ = ["DEFAULT_MAX_READ_BYTES", "DEFAULT_MAX_RECORDS", "MAX_RECORD_BYTES", "MAX_TXN_KEYS",
           "MAX_TXN_OPS", "ROLE_PREFIX", "EtcdAccess", "EtcdStore", "LedgerAccessError",
           "RevisionCompacted", "prefix_end"]

DEFAULT_MAX_READ_BYTES = 64 * 1024 * 1024
"""The largest response :class:`EtcdStore` accepts from a member (64 MiB)."""

MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``: :meth:`EtcdStore.read` splits longer lists of prefixes
and keys into transactions of this many, the later ones read at the first one's revision."""

MAX_RECORD_BYTES = 1536 * 1024 + 64 * 1024
"""What one record can weigh in a response, whatever a device wrote: etcd refuses a write over
its ``--max-request-bytes`` (1.5 MiB by default, key and value together), plus room for the
record's revisions and the response's framing."""

MAX_TXN_KEYS = 40
"""The most exact keys one read transaction asks for (fewer when ``max_read_bytes`` is
smaller than ``MAX_TXN_KEYS x MAX_RECORD_BYTES``): every device may fill its own entry keys with
values near etcd's request limit, and 40 x :data:`MAX_RECORD_BYTES` stays under
:data:`DEFAULT_MAX_READ_BYTES`, so no transaction's answer can exceed what a reader accepts."""

_RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
_ACCESS_DETAILS = ("authentication failed", "user name is empty", "invalid auth token",
                   "permission denied")
_MIN_ATTEMPT_S = 1.0

T = TypeVar("T")


class RevisionCompacted(TransportError):
    """A read pinned to a revision that etcd has compacted away meanwhile (``OUT_OF_RANGE``:
    "required revision has been compacted")."""


def _endpoint(e: str) -> str:
    if e.startswith("http://"):
        raise ConfigError(f"etcd endpoint {e!r} is plain HTTP; the ledger talks to etcd only "
                          "over mutual TLS: give host:port or https://host:port.")
    e = e.removeprefix("https://").rstrip("/")
    host, _, port = e.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"etcd endpoint {e!r} is not host:port (e.g. 127.0.0.1:2379).")
    return e


class EtcdStore:
    """The ledger's :class:`~shoal.ledger.store.KeyValueStore` on an etcd cluster.

    Args:
        endpoints: the members' client addresses (``host:port`` or ``https://host:port``).
        identity: this device's TLS identity from the project's CA; its certificate's CN is
            the etcd user every request runs as.
        timeout: seconds one call may take in all, across fail-overs.
        max_records: the most records :meth:`ranges` returns under one prefix.
        max_read_bytes: the largest response accepted from a member.

    Every call goes to the member that answered last; when it fails (down, partitioned, no
    leader), the call moves on to the next member, and after a pass over all of them waits
    briefly and tries again until ``timeout``; then a :class:`TransportError` names every
    member and its last gRPC status. A refusal by etcd's RBAC is a :class:`LedgerAccessError`.
    Safe to use from several threads.
    """

    def __init__(self, endpoints: Sequence[str], identity: Identity, *, timeout: float = 5.0,
                 max_records: int = DEFAULT_MAX_RECORDS,
                 max_read_bytes: int = DEFAULT_MAX_READ_BYTES):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ConfigError("EtcdStore: no endpoints; give the client addresses of the etcd "
                              "members (host:port).")
        if timeout <= 0 or max_records < 1 or max_read_bytes < 1024:
            raise ConfigError(f"EtcdStore: timeout={timeout}, max_records={max_records}, "
                              f"max_read_bytes={max_read_bytes}; expected a timeout > 0, "
                              "max_records >= 1 and max_read_bytes >= 1024.")
        self.endpoints = [_endpoint(e) for e in endpoints]
        self.identity = identity
        self.timeout = float(timeout)
        self.max_records = max_records
        self.max_read_bytes = max_read_bytes
        key, cert, ca = identity.read()
        self.device = peer_identity(cert)[0]
        """The CN of this store's certificate: the etcd user its requests run as."""
        self._creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                   certificate_chain=cert)
        self._members: list[Member | None] = [None] * len(self.endpoints)
        self._key_tails: dict[str, KeyStream] = {}  # one watch stream per prefix
        self._key_tails_lock = threading.Lock()  # held while a stream is (re)started
        self._current = 0
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"EtcdStore({self.endpoints}, device={self.device!r})"

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections and fail-over ----------------------------------------------------------

    def _member(self, i: int) -> Member:
        with self._lock:
            if self._closed:
                raise TransportError(f"{self!r} is closed; open a new EtcdStore.")
            m = self._members[i]
            if m is None:
                options = [("grpc.max_receive_message_length", self.max_read_bytes),
                           ("grpc.max_send_message_length", 4 * 1024 * 1024),
                           ("grpc.enable_retries", 0),
                           ("grpc.initial_reconnect_backoff_ms", 100),
                           ("grpc.min_reconnect_backoff_ms", 100),
                           ("grpc.max_reconnect_backoff_ms", 1000),
                           ("grpc.keepalive_time_ms", 10_000),
                           ("grpc.keepalive_timeout_ms", 5_000)]
                ch = grpc.secure_channel(self.endpoints[i], self._creds, options=options)
                m = Member(self.endpoints[i], ch, rpc_pb2_grpc.KVStub(ch),
                            rpc_pb2_grpc.WatchStub(ch), rpc_pb2_grpc.AuthStub(ch))
                self._members[i] = m
            return m

    def _access_error(self, what: str, key: str, e: grpc.RpcError) -> LedgerAccessError:
        return LedgerAccessError(
            f"etcd refused device {self.device!r} the {what} of {key!r} "
            f"({e.code().name}: {e.details()}); the device must be enrolled "
            f"(`shoal swarm enroll {self.device}`) and not revoked, and may write only under "
            f"its own prefix ROOT/peers/{self.device}/.", device=self.device, key=key)

    def _call(self, what: str, key: str,
              fn: Callable[[Member, float, bool], T], *, timeout: float | None = None) -> T:
        """Run ``fn(member, attempt_timeout, retried)`` on the members in turn until it
        returns (see the class docstring); ``what``/``key`` name the operation in errors."""
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        n = len(self.endpoints)
        failures: dict[str, str] = {}
        retried = False
        while True:
            for _ in range(n):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                i = self._current
                member = self._member(i)
                try:
                    return fn(member, min(remaining, max(budget / n, _MIN_ATTEMPT_S)), retried)
                except grpc.RpcError as e:
                    code, details = e.code(), e.details() or ""
                    if (code in (grpc.StatusCode.PERMISSION_DENIED,
                                 grpc.StatusCode.UNAUTHENTICATED)
                            or any(d in details for d in _ACCESS_DETAILS)):
                        raise self._access_error(what, key, e) from None
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than" in details:
                        raise TransportError(
                            f"etcd: the {what} of {key!r} returned more than max_read_bytes="
                            f"{self.max_read_bytes} bytes from {member.endpoint}; read "
                            "narrower prefixes or raise EtcdStore(max_read_bytes=...).") from None
                    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
                        raise RevisionCompacted(
                            f"etcd: the {what} of {key!r} asked for a revision compacted "
                            f"away on {member.endpoint} ({details}).") from None
                    stale_auth = "revision of auth store is old" in details
                    busy = "too many requests" in details
                    if code not in _RETRY_CODES and not stale_auth and not busy:
                        raise TransportError(
                            f"etcd: the {what} of {key!r} failed on {member.endpoint} "
                            f"({code.name}: {details}).") from None
                    failures[member.endpoint] = f"{code.name}: {details}"
                    retried = True
                    if not stale_auth:  # the next call goes to another member
                        with self._lock:
                            if self._current == i:
                                self._current = (i + 1) % n
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                said = "; ".join(f"{ep}: {failures.get(ep, 'not tried')}"
                                 for ep in self.endpoints)
                raise TransportError(
                    f"etcd: the {what} of {key!r} failed on every member within {budget:g} s "
                    f"({said}). Check that the members run and are reachable, and that this "
                    f"device's certificate (CN {self.device!r}) was issued by the project's CA "
                    "and is not revoked (a member refuses the TLS handshake otherwise).")
            time.sleep(min(0.1, remaining))

    # -- the KeyValueStore ------------------------------------------------------------------

    def create(self, key: str, value: bytes) -> int | None:
        """Write once (see :class:`~shoal.ledger.store.KeyValueStore`): one transaction
        requiring ``create_revision(key) == 0``. A create retried after a failure whose
        outcome is unknown (a member died after the write committed) that finds ``key``
        holding exactly ``value`` returns that write's revision."""
        k, v = key.encode(), bytes(value)
        txn = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL,
                                     target=rpc_pb2.Compare.CREATE, key=k, create_revision=0)],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=v))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=k))])

        def run(m: Member, t: float, retried: bool) -> int | None:
            r = m.kv.Txn(txn, timeout=t, metadata=REQUIRE_LEADER)
            if r.succeeded:
                return int(r.header.revision)
            kvs = r.responses[0].response_range.kvs if r.responses else []
            if retried and kvs and kvs[0].value == v:
                return int(kvs[0].create_revision)
            return None
        return self._call("create", key, run)

    def ranges(self, prefixes: Sequence[str]) -> tuple[list[list[Record]], int]:
        """The records under each prefix, sorted by key, and the revision they were read at
        (see :class:`~shoal.ledger.store.KeyValueStore`): :meth:`read` with no exact keys.
        More than ``max_records`` under a prefix is a
        :class:`~shoal.ledger.store.TooManyRecords`."""
        got, _, revision = self.read(prefixes, ())
        return got, revision

    def read(self, prefixes: Sequence[str], keys: Sequence[str]
             ) -> tuple[list[list[Record]], list[Record | None], int]:
        """The records under each of ``prefixes`` (sorted by key; more than ``max_records``
        under one is a :class:`~shoal.ledger.store.TooManyRecords`), the record of each of
        ``keys`` (``None`` where it does not exist) and the revision all were read at: range
        requests and single-key gets, :data:`MAX_TXN_OPS` to a linearizable transaction and at
        most :meth:`keys_per_txn` exact keys to one (so no answer can exceed
        ``max_read_bytes``, however big the values devices wrote under their keys), the
        transactions after the first pinned to its revision. A key's get returns that key
        only, so what it costs does not depend on how many keys share its prefix. When etcd
        compacts that revision before a later transaction ran, the whole read starts again
        once, at a new revision."""
        prefixes, keys = list(prefixes), list(keys)
        try:
            return self._read(prefixes, keys)
        except RevisionCompacted:
            # etcd compacted the first transaction's revision before a later one ran: read
            # everything again, at a new revision (once: a second compaction within one read
            # means compactions race every read, and the caller hears of it).
            return self._read(prefixes, keys)

    def _chunks(self, n_prefixes: int, n_keys: int) -> list[tuple[int, int]]:
        """``(start, end)`` of each transaction over the ops of ``n_prefixes`` ranges then
        ``n_keys`` exact keys: at most :data:`MAX_TXN_OPS` ops and at most
        :meth:`keys_per_txn` exact keys each."""
        per_txn = self.keys_per_txn()
        out: list[tuple[int, int]] = []
        start, keys_in = 0, 0
        for i in range(n_prefixes + n_keys):
            if i - start == MAX_TXN_OPS or keys_in == per_txn:
                out.append((start, i))
                start, keys_in = i, 0
            if i >= n_prefixes:
                keys_in += 1
        out.append((start, n_prefixes + n_keys))
        return out

    def keys_per_txn(self) -> int:
        """The most exact keys :meth:`read` asks for in one transaction: :data:`MAX_TXN_KEYS`,
        or fewer where ``max_read_bytes`` is smaller (so that the largest records any device can
        write still fit one response)."""
        return max(1, min(MAX_TXN_KEYS, self.max_read_bytes // MAX_RECORD_BYTES))

    def _read(self, prefixes: list[str], keys: list[str]
              ) -> tuple[list[list[Record]], list[Record | None], int]:
        ops = [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(
            key=p.encode(), range_end=prefix_end(p.encode()), limit=self.max_records,
            sort_order=rpc_pb2.RangeRequest.ASCEND,
            sort_target=rpc_pb2.RangeRequest.KEY)) for p in prefixes]
        ops += [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=k.encode()))
                for k in keys]
        names = prefixes + keys
        ranged: list[list[Record]] = []
        exact: list[Record | None] = []
        revision = 0
        for i, end in self._chunks(len(prefixes), len(keys)):
            chunk = ops[i:end]
            if revision:
                for op in chunk:
                    op.request_range.revision = revision
            txn = rpc_pb2.TxnRequest(success=chunk)

            def run(m: Member, t: float, retried: bool, txn: Any = txn) -> Any:
                return m.kv.Txn(txn, timeout=t, metadata=REQUIRE_LEADER)
            part = names[i:end]
            name = (part[0] if len(part) == 1 else
                    f"{part[0]}, ... ({len(part)} in all)" if part else "(nothing)")
            r = self._call("read", name, run)
            if not revision:
                revision = int(r.header.revision)
            if len(r.responses) != len(chunk):
                raise TransportError(f"etcd: the read of {name!r} answered {len(r.responses)} "
                                     f"of {len(chunk)} requests.")
            for j, resp in enumerate(r.responses, start=i):
                rr = resp.response_range
                if j < len(prefixes):
                    if rr.more:
                        raise TooManyRecords(prefixes[j], self.max_records, int(rr.count))
                    ranged.append([to_record(kv) for kv in rr.kvs])
                else:
                    exact.append(to_record(rr.kvs[0]) if rr.kvs else None)
        return ranged, exact, revision

    def list_keys(self, prefix: str) -> tuple[list[str], int]:
        """The keys under ``prefix`` (sorted; their values are not read, so what this costs does
        not depend on how big they are) and the revision they were read at; more than
        ``max_records`` is a :class:`~shoal.ledger.store.TooManyRecords`."""
        p = prefix.encode()
        req = rpc_pb2.RangeRequest(key=p, range_end=prefix_end(p), limit=self.max_records,
                                   keys_only=True, sort_order=rpc_pb2.RangeRequest.ASCEND,
                                   sort_target=rpc_pb2.RangeRequest.KEY)
        r = self._call("key listing", prefix, lambda m, t, retried: m.kv.Range(
            req, timeout=t, metadata=REQUIRE_LEADER))
        if r.more:
            raise TooManyRecords(prefix, self.max_records, int(r.count))
        return [kv.key.decode(errors="replace") for kv in r.kvs], int(r.header.revision)

    def watch_keys(self, prefix: str, keys: Collection[str], revision: int,
                   timeout: float) -> list[Record]:
        """The newest records of ``keys`` (exact keys, all under ``prefix``) modified after
        ``revision``, in revision order, as soon as there is one; ``[]`` when ``timeout``
        passes first (see :class:`~shoal.ledger.store.KeyValueStore`).

        One watch stream on ``prefix`` stays open for every caller
        (:class:`~shoal.ledger.etcd_watch.KeyStream`): it keeps the newest record of each key
        some caller is waiting for and drops every other event, so a flood of other keys under
        the prefix can neither grow it nor evict what a caller waits for. A call registers its
        keys with the stream, then reads them (:meth:`read`, one get per key): what was
        written before the registration the read sees, what is written after it the stream
        keeps. A stream that failed (its start revision compacted away, or it kept failing at
        one revision: see :mod:`shoal.ledger.etcd_watch`) is replaced; a refusal
        by RBAC, of the read or of the watch, is a :class:`LedgerAccessError`."""
        wanted = list(dict.fromkeys(keys))
        if any(not k.startswith(prefix) for k in wanted):
            raise ValueError(f"watch_keys: every key must be under {prefix!r}")
        deadline = time.monotonic() + max(0.0, timeout)
        if not wanted:
            time.sleep(max(0.0, timeout))
            return []
        while True:
            with self._key_tails_lock:
                stream = self._key_tails.get(prefix)
                if stream is None or not stream.healthy():
                    if stream is not None:
                        stream.stop()
                    # The new stream starts right after the read, so it misses nothing.
                    _, got, at = self.read((), wanted)
                    stream = KeyStream(self, prefix, at, interest=wanted)
                    with self._lock:
                        self._key_tails[prefix] = stream
                else:
                    stream.register(wanted)
                    got = None
            try:
                if got is None:
                    _, got, _ = self.read((), wanted)
                new = sorted((r for r in got if r is not None and r.mod_revision > revision),
                             key=lambda r: r.mod_revision)
                if new:
                    return new
                found = stream.get_keys(wanted, revision, deadline - time.monotonic())
            finally:
                stream.unregister(wanted)
            if found is not None:
                return found
            if time.monotonic() >= deadline:  # the stream failed (compacted, stopped)
                return []

    def close(self) -> None:
        """Close the channels to every member; the store cannot be used afterwards."""
        with self._lock:
            streams, self._key_tails = list(self._key_tails.values()), {}
        for stream in streams:
            stream.stop()
        with self._lock:
            self._closed = True
            members, self._members = self._members, [None] * len(self.endpoints)
        for m in members:
            if m is not None:
                m.channel.close()

    # -- an administrator's powers ----------------------------------------------------------

    def put(self, key: str, value: bytes) -> int:
        """Overwrite ``key`` (an administrator's power, not the ledger's: a device's role
        allows it only under its own prefix); the write's revision."""
        req = rpc_pb2.PutRequest(key=key.encode(), value=bytes(value))
        return self._call("put", key, lambda m, t, r: int(
            m.kv.Put(req, timeout=t, metadata=REQUIRE_LEADER).header.revision))

    def delete(self, key: str) -> bool:
        """Remove ``key`` (an administrator's power); whether it existed."""
        req = rpc_pb2.DeleteRangeRequest(key=key.encode())
        return self._call("delete", key, lambda m, t, r: int(
            m.kv.DeleteRange(req, timeout=t, metadata=REQUIRE_LEADER).deleted) > 0)

    def access(self) -> EtcdAccess:
        """etcd's RBAC through this store's connection (needs an administrator's identity,
        e.g. the ``registrar``); what :class:`~shoal.ledger.enroll.Registrar` grants with."""
        return EtcdAccess(self)

    def leads(self) -> bool:
        """Whether the member this store talks to (give it one endpoint) leads the cluster."""
        st = self._call("status", self.endpoints[0], lambda m, t, r: rpc_pb2_grpc.MaintenanceStub(
            m.channel).Status(rpc_pb2.StatusRequest(), timeout=t))
        return bool(st.leader) and st.leader == st.header.member_id

    def ping(self, timeout: float | None = None) -> int:
        """A linearizable read (the cluster has a leader and this member follows it); the
        store's revision."""
        req = rpc_pb2.RangeRequest(key=b"\0", limit=1)
        return self._call("health check", "\\0", lambda m, t, r: int(
            m.kv.Range(req, timeout=t, metadata=REQUIRE_LEADER).header.revision),
            timeout=timeout)

