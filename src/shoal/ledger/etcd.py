"""The ledger's store in deployment: an etcd cluster, reached over mutual TLS.

Why etcd: its v3 API gives exactly what :class:`~shoal.ledger.store.KeyValueStore` asks for —
write-once creates (a transaction comparing ``create_revision`` with 0), reads of several
prefixes at one revision (one transaction of range requests), watches from a revision, and a
single revision counter that Raft replicates across the members. Why mutual TLS and no
passwords: with ``--client-cert-auth`` and auth enabled, etcd takes the common name (CN) of
the client's certificate as its user name (over gRPC), so the certificate the project's CA
issued a device *is* its ledger account; the per-device role that
:mod:`shoal.ledger.enroll` grants decides what it may read and write.

We talk to etcd through the generated gRPC stubs of ``aetcd`` only (its client class opens
insecure channels), over our own ``grpc.secure_channel``.

* :class:`EtcdStore` — the :class:`~shoal.ledger.store.KeyValueStore` on a cluster, failing over
  between its members; an administrator's ``put``/``delete`` and the etcd side of enrollment
  (:meth:`EtcdStore.access`).
* :class:`EtcdAccess` — users and roles (enrollment) and the RBAC bootstrap of a fresh cluster;
  :class:`~shoal.ledger.cluster.EtcdCluster` starts a local one.

Bounds: a read returns at most ``max_records`` records per prefix (etcd's ``limit``; more is a
:class:`~shoal.ledger.store.TooManyRecords` naming the prefix, never a silent truncation) and at
most ``max_read_bytes`` in one response (gRPC's ``max_receive_message_length``), so a hostile or
broken member cannot exhaust a reader's memory. etcd itself refuses writes over its
``--max-request-bytes`` (1.5 MiB by default).

What the ledger reads is bounded by what it asks for, not by what others wrote: a round is read
by the exact keys of its entries (:meth:`EtcdStore.read`: one get per key, :data:`MAX_TXN_OPS`
per transaction, every transaction at the first one's revision), and followed by
:meth:`EtcdStore.watch_keys`, whose stream keeps only the newest record of the keys somebody
waits for. A device that writes a flood of other keys under its own prefix (which etcd's RBAC
lets it do) costs a reader nothing but the watch events that stream past.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aetcd.rpc import auth_pb2, rpc_pb2, rpc_pb2_grpc

from ..errors import ConfigError, TransportError
from ..net.ca import Identity, peer_identity
from .store import DEFAULT_MAX_RECORDS, Record, TooManyRecords

__all__ = ["DEFAULT_MAX_READ_BYTES", "DEFAULT_MAX_RECORDS", "MAX_TAIL_RECORDS", "MAX_TXN_OPS",
           "ROLE_PREFIX", "EtcdAccess", "EtcdStore", "LedgerAccessError", "prefix_end"]

DEFAULT_MAX_READ_BYTES = 64 * 1024 * 1024
"""The largest response :class:`EtcdStore` accepts from a member (64 MiB)."""

ROLE_PREFIX = "shoal-peer-"
"""The etcd role of device ``D`` is ``shoal-peer-D``."""

MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``: :meth:`EtcdStore.read` splits longer lists of prefixes
and keys into transactions of this many, the later ones read at the first one's revision."""

_REQUIRE_LEADER = (("hasleader", "true"),)  # a member without a leader refuses (fail over)
_RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
_ACCESS_DETAILS = ("authentication failed", "user name is empty", "invalid auth token",
                   "permission denied")
_MIN_ATTEMPT_S = 1.0

T = TypeVar("T")


class LedgerAccessError(TransportError):
    """etcd refused this device a read or write: the device is not enrolled, was revoked, or
    wrote outside its own prefix. ``device`` and ``key`` name who and what."""

    def __init__(self, message: str, *, device: str, key: str):
        super().__init__(message)
        self.device = device
        self.key = key


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


def _endpoint(e: str) -> str:
    if e.startswith("http://"):
        raise ConfigError(f"etcd endpoint {e!r} is plain HTTP; the ledger talks to etcd only "
                          "over mutual TLS: give host:port or https://host:port.")
    e = e.removeprefix("https://").rstrip("/")
    host, _, port = e.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"etcd endpoint {e!r} is not host:port (e.g. 127.0.0.1:2379).")
    return e


@dataclass
class _Member:
    endpoint: str
    channel: grpc.Channel
    kv: Any
    watch: Any
    auth: Any


def _record(kv: Any) -> Record:
    """A store record from etcd's ``mvccpb.KeyValue``."""
    return Record(kv.key.decode(), bytes(kv.value), int(kv.create_revision),
                  int(kv.mod_revision), int(kv.version))


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
        self._members: list[_Member | None] = [None] * len(self.endpoints)
        self._tails: dict[str, _Tail] = {}
        self._key_tails: dict[str, _Tail] = {}
        self._key_tails_lock = threading.Lock()  # held while a key tail is (re)started
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

    def _member(self, i: int) -> _Member:
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
                m = _Member(self.endpoints[i], ch, rpc_pb2_grpc.KVStub(ch),
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
              fn: Callable[[_Member, float, bool], T], *, timeout: float | None = None) -> T:
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

        def run(m: _Member, t: float, retried: bool) -> int | None:
            r = m.kv.Txn(txn, timeout=t, metadata=_REQUIRE_LEADER)
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
        requests and single-key gets, :data:`MAX_TXN_OPS` to a linearizable transaction, the
        transactions after the first pinned to its revision. A key's get returns that key
        only, so what it costs does not depend on how many keys share its prefix."""
        prefixes, keys = list(prefixes), list(keys)
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
        for i in range(0, max(len(ops), 1), MAX_TXN_OPS):
            chunk = ops[i:i + MAX_TXN_OPS]
            if revision:
                for op in chunk:
                    op.request_range.revision = revision
            txn = rpc_pb2.TxnRequest(success=chunk)

            def run(m: _Member, t: float, retried: bool, txn: Any = txn) -> Any:
                return m.kv.Txn(txn, timeout=t, metadata=_REQUIRE_LEADER)
            part = names[i:i + MAX_TXN_OPS]
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
                    ranged.append([_record(kv) for kv in rr.kvs])
                else:
                    exact.append(_record(rr.kvs[0]) if rr.kvs else None)
        return ranged, exact, revision

    def wait(self, prefix: str, revision: int, timeout: float,
             match: Callable[[str], bool] | None = None) -> bool:
        """:meth:`watch`, saying only whether something was written (``True``) — or, when the
        start revision was compacted away, may have been."""
        got = self._watch(prefix, revision, timeout, match)
        return got is None or bool(got)

    def watch(self, prefix: str, revision: int, timeout: float,
              match: Callable[[str], bool] | None = None) -> list[Record]:
        """The records under ``prefix`` that ``match`` accepts, written after ``revision``, in
        revision order, as soon as there is one; ``[]`` when ``timeout`` passes first; see
        :class:`~shoal.ledger.store.KeyValueStore`.

        The first call on a prefix opens a watch stream that stays open (:class:`_Tail`):
        etcd delivers events at once to a watch that is up to date, but serves one that
        starts at a past revision only from its sync loop, every 100 ms — which a follower
        asking again after each event would pay every time. A start revision etcd compacted
        away gives a fresh read of the prefix instead."""
        with self._lock:
            tail = self._tails.get(prefix)
            if tail is None or not tail.covers(revision):
                if tail is not None:
                    tail.stop()
                tail = self._tails[prefix] = _Tail(self, prefix, revision)
        got = tail.get(revision, timeout, match)
        if got is not None:
            return got
        got = self._watch(prefix, revision, timeout, match)
        if got is None:  # compacted: whatever is there now
            (records,), _ = self.ranges([prefix])
            return [r for r in records if r.mod_revision > revision
                    and (match is None or match(r.key))]
        return got

    def watch_keys(self, prefix: str, keys: Collection[str], revision: int,
                   timeout: float) -> list[Record]:
        """The newest records of ``keys`` (exact keys, all under ``prefix``) modified after
        ``revision``, in revision order, as soon as there is one; ``[]`` when ``timeout``
        passes first (see :class:`~shoal.ledger.store.KeyValueStore`).

        One watch stream on ``prefix`` stays open for every caller (a :class:`_Tail` in
        key mode): it keeps the newest record of each key some caller is waiting for and
        drops every other event, so a flood of other keys under the prefix can neither grow
        it nor evict what a caller waits for. A call registers its keys with the stream,
        then reads them (:meth:`read`, one get per key): what was written before the
        registration the read sees, what is written after it the stream keeps."""
        wanted = list(dict.fromkeys(keys))
        if any(not k.startswith(prefix) for k in wanted):
            raise ValueError(f"watch_keys: every key must be under {prefix!r}")
        deadline = time.monotonic() + max(0.0, timeout)
        if not wanted:
            time.sleep(max(0.0, timeout))
            return []
        while True:
            with self._key_tails_lock:
                tail = self._key_tails.get(prefix)
                if tail is None or not tail.healthy():
                    if tail is not None:
                        tail.stop()
                    # The new stream starts right after the read, so it misses nothing.
                    _, got, at = self.read((), wanted)
                    tail = _Tail(self, prefix, at, interest=wanted)
                    with self._lock:
                        self._key_tails[prefix] = tail
                else:
                    tail.register(wanted)
                    got = None
            try:
                if got is None:
                    _, got, _ = self.read((), wanted)
                new = sorted((r for r in got if r is not None and r.mod_revision > revision),
                             key=lambda r: r.mod_revision)
                if new:
                    return new
                found = tail.get_keys(wanted, revision, deadline - time.monotonic())
            finally:
                tail.unregister(wanted)
            if found is not None:
                return found
            if time.monotonic() >= deadline:  # the stream failed (compacted, stopped)
                return []

    def _watch(self, prefix: str, revision: int, timeout: float,
               match: Callable[[str], bool] | None) -> list[Record] | None:
        """Block until a key under ``prefix`` (and, given ``match``, one it accepts) is written
        after ``revision`` (``True``) or ``timeout`` seconds pass (``False``); see
        :class:`~shoal.ledger.store.KeyValueStore`.

        A watch stream on the prefix from ``revision + 1`` (puts only), cancelled when it
        returns; a member that fails mid-watch hands over to the next. A start revision etcd
        compacted away counts as a change (``True``: something may have been written). When
        no member could be watched at all, a :class:`TransportError`."""
        p = prefix.encode()
        if timeout <= 0:
            def count(m: _Member, t: float, retried: bool) -> list[Record]:
                r = m.kv.Range(rpc_pb2.RangeRequest(
                    key=p, range_end=prefix_end(p), limit=self.max_records,
                    min_mod_revision=revision + 1), timeout=t, metadata=_REQUIRE_LEADER)
                if r.more:  # a truncated answer could hide the write waited for
                    raise TooManyRecords(prefix, self.max_records, int(r.count))
                return [_record(kv) for kv in r.kvs
                        if match is None or match(kv.key.decode(errors="replace"))]
            return self._call("watch", prefix, count, timeout=self.timeout)
        deadline = time.monotonic() + timeout
        create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=p, range_end=prefix_end(p), start_revision=revision + 1,
            filters=[rpc_pb2.WatchCreateRequest.NODELETE]))
        watched = False

        def watch(m: _Member, t: float, retried: bool) -> list[Record] | None:
            nonlocal watched
            done = threading.Event()

            def requests() -> Any:
                yield create
                done.wait()  # keep the stream open until we are done with it
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            call = m.watch.Watch(requests(), timeout=remaining, metadata=_REQUIRE_LEADER)
            try:
                for resp in call:
                    if resp.canceled:
                        if resp.compact_revision:
                            return None
                        reason = resp.cancel_reason or "cancelled by the member"
                        if "permission denied" in reason:
                            raise LedgerAccessError(
                                f"etcd refused device {self.device!r} a watch of {prefix!r} "
                                f"({reason}); the device must be enrolled (`shoal swarm "
                                f"enroll {self.device}`) and not revoked.",
                                device=self.device, key=prefix)
                        raise TransportError(f"etcd: the watch of {prefix!r} on "
                                             f"{m.endpoint} was cancelled ({reason}).")
                    if resp.created:
                        watched = True
                    got = [_record(ev.kv) for ev in resp.events
                           if match is None or match(ev.kv.key.decode(errors="replace"))]
                    if got:
                        return got
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and watched:
                    return []
                raise
            finally:
                done.set()
                call.cancel()
            raise _StreamEnded(m.endpoint)

        try:
            return self._call("watch", prefix, watch, timeout=max(timeout, 1e-3))
        except LedgerAccessError:
            raise
        except TransportError:
            if watched and time.monotonic() >= deadline:
                return []
            raise

    def close(self) -> None:
        """Close the channels to every member; the store cannot be used afterwards."""
        with self._lock:
            tails, self._tails = list(self._tails.values()), {}
            tails += list(self._key_tails.values())
            self._key_tails = {}
        for t in tails:
            t.stop()
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
            m.kv.Put(req, timeout=t, metadata=_REQUIRE_LEADER).header.revision))

    def delete(self, key: str) -> bool:
        """Remove ``key`` (an administrator's power); whether it existed."""
        req = rpc_pb2.DeleteRangeRequest(key=key.encode())
        return self._call("delete", key, lambda m, t, r: int(
            m.kv.DeleteRange(req, timeout=t, metadata=_REQUIRE_LEADER).deleted) > 0)

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
            m.kv.Range(req, timeout=t, metadata=_REQUIRE_LEADER).header.revision),
            timeout=timeout)


MAX_TAIL_RECORDS = 10_000
"""Records a :class:`_Tail` keeps (the oldest go first; a follower asking for older ones gets
a one-shot watch instead)."""


class _Tail:
    """A watch stream kept open on one prefix of an :class:`EtcdStore`, from ``revision + 1``.
    When its member fails, it reopens on the next one from the last revision it saw; a refusal
    by RBAC ends it, and :meth:`get` / :meth:`get_keys` raise it.

    Two modes. Without ``interest`` it buffers what it delivers (at most
    :data:`MAX_TAIL_RECORDS`, the oldest go first) for :meth:`get`. With ``interest`` (key
    mode, :meth:`EtcdStore.watch_keys`) it keeps only the newest record of each key that is
    :meth:`register`-ed (counted: several callers may wait for one key) and drops every other
    event unread, counting it in ``ignored``: what it holds is bounded by the keys waited
    for, whatever is written beside them."""

    def __init__(self, store: EtcdStore, prefix: str, revision: int,
                 interest: Sequence[str] | None = None):
        self.store, self.prefix = store, prefix
        self.first = revision + 1  # the oldest revision this tail has every record of
        self.seen = revision
        self.records: list[Record] = []
        self.keyed = interest is not None
        self.interest: dict[str, int] = {}  # key -> how many callers wait for it
        self.latest: dict[str, Record] = {}  # key mode: the newest record of each such key
        self.ignored = 0  # key mode: events of keys nobody waited for
        for k in interest or ():
            self.interest[k] = self.interest.get(k, 0) + 1
        self.error: Exception | None = None
        self.compacted = False
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"etcd-tail {prefix}",
                                        daemon=True)
        self._thread.start()

    def healthy(self) -> bool:
        """Whether the stream still runs (not stopped, compacted or refused)."""
        return not self._stopped.is_set() and self.error is None and not self.compacted

    def register(self, keys: Sequence[str]) -> None:
        """Keep the records of ``keys`` from now on (key mode)."""
        with self._cond:
            for k in keys:
                self.interest[k] = self.interest.get(k, 0) + 1

    def unregister(self, keys: Sequence[str]) -> None:
        """Undo one :meth:`register` of ``keys``; a key nobody waits for any more is dropped."""
        with self._cond:
            for k in keys:
                n = self.interest.get(k, 0) - 1
                if n > 0:
                    self.interest[k] = n
                else:
                    self.interest.pop(k, None)
                    self.latest.pop(k, None)

    def get_keys(self, keys: Sequence[str], revision: int, timeout: float) -> list[Record] | None:
        """The kept records of ``keys`` (registered) modified after ``revision``, in revision
        order, waiting up to ``timeout`` for one; ``None`` when the stream failed."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                if self.error is not None:
                    raise self.error
                if not self.healthy():
                    return None
                got = sorted((r for k in keys if (r := self.latest.get(k)) is not None
                              and r.mod_revision > revision), key=lambda r: r.mod_revision)
                left = deadline - time.monotonic()
                if got or left <= 0:
                    return got
                self._cond.wait(min(left, 1.0))

    def covers(self, revision: int) -> bool:
        """Whether :meth:`get` can answer for records after ``revision``."""
        return (not self._stopped.is_set() and self.error is None and not self.compacted
                and revision + 1 >= self.first)

    def get(self, revision: int, timeout: float,
            match: Callable[[str], bool] | None) -> list[Record] | None:
        """The buffered records after ``revision`` that ``match`` accepts, waiting up to
        ``timeout`` for one; ``None`` when this tail cannot answer (compacted, stopped)."""
        def found() -> list[Record]:
            return [r for r in self.records if r.mod_revision > revision
                    and (match is None or match(r.key))]
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self.error is not None:
                    raise self.error
                if not self.covers(revision):
                    return None
                got = found()
                left = deadline - time.monotonic()
                if got or left <= 0:
                    return got
                self._cond.wait(min(left, 1.0))

    def stop(self) -> None:
        """Close the stream and end the thread."""
        self._stopped.set()
        call = self._call
        if call is not None:
            call.cancel()
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        p = self.prefix.encode()
        n = len(self.store.endpoints)
        i = self.store._current
        while not self._stopped.is_set():
            done = threading.Event()
            create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=p, range_end=prefix_end(p), start_revision=self.seen + 1,
                filters=[rpc_pb2.WatchCreateRequest.NODELETE]))

            def requests(create: Any = create, done: threading.Event = done) -> Any:
                yield create
                done.wait()
            try:
                m = self.store._member(i)
                self._call = m.watch.Watch(requests(), metadata=_REQUIRE_LEADER)
                for resp in self._call:
                    if resp.canceled:
                        reason = resp.cancel_reason or "cancelled by the member"
                        with self._cond:
                            if resp.compact_revision:
                                self.compacted = True
                            elif "permission denied" in reason:
                                self.error = LedgerAccessError(
                                    f"etcd refused device {self.store.device!r} a watch of "
                                    f"{self.prefix!r} ({reason}); the device must be enrolled "
                                    f"(`shoal swarm enroll {self.store.device}`) and not "
                                    "revoked.", device=self.store.device, key=self.prefix)
                            self._cond.notify_all()
                        if self.compacted or self.error is not None:
                            return
                        break
                    if resp.events and self.keyed:
                        with self._cond:
                            kept = False
                            for ev in resp.events:
                                self.seen = max(self.seen, int(ev.kv.mod_revision))
                                key = ev.kv.key.decode(errors="replace")
                                if key in self.interest:
                                    self.latest[key] = _record(ev.kv)
                                    kept = True
                                else:
                                    self.ignored += 1
                            if kept:
                                self._cond.notify_all()
                    elif resp.events:
                        with self._cond:
                            for ev in resp.events:
                                self.records.append(_record(ev.kv))
                                self.seen = max(self.seen, int(ev.kv.mod_revision))
                            if len(self.records) > MAX_TAIL_RECORDS:
                                del self.records[:len(self.records) - MAX_TAIL_RECORDS]
                                self.first = self.records[0].mod_revision
                            self._cond.notify_all()
            except (grpc.RpcError, TransportError):
                pass  # the member failed (or we stopped): reopen on the next one
            finally:
                done.set()
                if self._call is not None:
                    self._call.cancel()
            if not self._stopped.is_set():
                i = (i + 1) % n
                self._stopped.wait(0.1)


class _StreamEnded(grpc.RpcError):
    """A watch stream that a member closed without an answer (retried on another member)."""

    def __init__(self, endpoint: str):
        super().__init__(f"the watch stream on {endpoint} ended")
        self._endpoint = endpoint

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return f"the watch stream on {self._endpoint} ended without an answer"


class EtcdAccess:
    """etcd's side of enrollment: a user per device (named by its certificate's CN, no
    password) with the role ``shoal-peer-DEVICE``. Runs through ``store``, whose identity
    must be an administrator's (role ``root``)."""

    def __init__(self, store: EtcdStore):
        self.store = store

    def __repr__(self) -> str:
        return f"EtcdAccess({self.store!r})"

    def _auth(self, what: str, name: str, method: str, req: Any,
              tolerate: str | None = None) -> None:
        def run(m: _Member, t: float, retried: bool) -> None:
            try:
                getattr(m.auth, method)(req, timeout=t, metadata=_REQUIRE_LEADER)
            except grpc.RpcError as e:
                if tolerate is None or tolerate not in (e.details() or ""):
                    raise
        self.store._call(what, name, run)

    def grant(self, device: str, read_prefix: str, write_prefix: str) -> None:
        """Let ``device`` read every key under ``read_prefix`` and read and write under
        ``write_prefix`` (and nothing else): its role gets the two permissions, its user (no
        password; its certificate's CN authenticates it) the role. A user left by an
        interrupted enrollment is reused only when it holds no other role."""
        role = ROLE_PREFIX + device
        self._auth("role add", role, "RoleAdd", rpc_pb2.AuthRoleAddRequest(name=role),
                   tolerate="role name already exists")
        for typ, prefix in ((auth_pb2.Permission.READ, read_prefix),
                            (auth_pb2.Permission.READWRITE, write_prefix)):
            p = prefix.encode()
            self._auth("permission grant", role, "RoleGrantPermission",
                       rpc_pb2.AuthRoleGrantPermissionRequest(name=role, perm=auth_pb2.Permission(
                           permType=typ, key=p, range_end=prefix_end(p))))
        self._auth("user add", device, "UserAdd", rpc_pb2.AuthUserAddRequest(
            name=device, options=auth_pb2.UserAddOptions(no_password=True)),
            tolerate="user name already exists")
        roles = self.roles(device)
        if set(roles) - {role}:
            raise ConfigError(f"etcd: the user {device!r} already exists with the roles "
                              f"{roles}; a device's user may hold only {role!r}. Remove the "
                              "user (`etcdctl user delete`) or enroll under another id.")
        self._auth("role grant", device, "UserGrantRole",
                   rpc_pb2.AuthUserGrantRoleRequest(user=device, role=role))

    def roles(self, device: str) -> list[str]:
        """The etcd roles of ``device``'s user (empty when it has none or no user)."""
        def run(m: _Member, t: float, retried: bool) -> list[str]:
            try:
                r = m.auth.UserGet(rpc_pb2.AuthUserGetRequest(name=device), timeout=t,
                                   metadata=_REQUIRE_LEADER)
            except grpc.RpcError as e:
                if "user name not found" in (e.details() or ""):
                    return []
                raise
            return list(r.roles)
        return self.store._call("user get", device, run)

    def revoke(self, device: str) -> None:
        """Delete ``device``'s user and role, so that it can neither read nor write, even on
        a connection it already holds (idempotent)."""
        self._auth("user delete", device, "UserDelete",
                   rpc_pb2.AuthUserDeleteRequest(name=device), tolerate="user name not found")
        self._auth("role delete", ROLE_PREFIX + device, "RoleDelete",
                   rpc_pb2.AuthRoleDeleteRequest(role=ROLE_PREFIX + device),
                   tolerate="role name not found")

    def bootstrap(self, admin: str) -> None:
        """Turn on RBAC on a fresh cluster: the role ``root``, the users ``root`` and
        ``admin`` (no password; certificates name them) with that role, then auth enabled.
        Run it once, as any certificate of the project's CA, before the first enrollment."""
        self._auth("role add", "root", "RoleAdd", rpc_pb2.AuthRoleAddRequest(name="root"),
                   tolerate="role name already exists")
        for user in ("root", admin):
            self._auth("user add", user, "UserAdd", rpc_pb2.AuthUserAddRequest(
                name=user, options=auth_pb2.UserAddOptions(no_password=True)),
                tolerate="user name already exists")
            self._auth("role grant", user, "UserGrantRole",
                       rpc_pb2.AuthUserGrantRoleRequest(user=user, role="root"))
        self._auth("auth enable", "auth", "AuthEnable", rpc_pb2.AuthEnableRequest())
