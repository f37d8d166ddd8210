"""The watch streams behind :meth:`EtcdStore.watch_keys <shoal.ledger.etcd.EtcdStore.watch_keys>`.

etcd delivers events at once to a watch that is up to date, but serves one that starts at a
past revision only from its sync loop, every 100 ms — which a follower watching again after
each event would pay every time. So an :class:`~shoal.ledger.etcd.EtcdStore` keeps one
:class:`KeyStream` open per prefix, shared by every caller: it keeps the newest record of each
key some caller waits for and drops every other event unread, so what it holds is bounded by
the keys waited for, whatever is written beside them (a hostile device's flood of keys under
its own prefix streams past and is only counted). When its member fails, the stream reopens
on the next one from the last revision it saw; a refusal by etcd's RBAC ends it and is raised
to the callers.

A stream reopened from a past revision gets every event since then at once — a device that
wrote tens of MiB under its own prefix meanwhile would make that one answer exceed what a reader
accepts, and every reopen fail the same way. So the stream asks for fragmented answers
(``fragment=True``: etcd splits an answer over its request limit into parts of whole events,
each but the last marked ``fragment``), and a stream that keeps failing without getting past
its revision (:data:`MAX_STALLS` times, or :data:`MAX_EXHAUSTED` times ``RESOURCE_EXHAUSTED``;
with growing pauses in between) gives up: it turns unhealthy, says so in the log (rate-limited),
and :meth:`EtcdStore.watch_keys <shoal.ledger.etcd.EtcdStore.watch_keys>` replaces it by a
fresh read and a stream from that read's revision.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from aetcd.rpc import rpc_pb2

from ..errors import TransportError
from ..net.limits import LogLimiter
from .etcd_rpc import REQUIRE_LEADER, LedgerAccessError, prefix_end, to_record
from .store import Record

if TYPE_CHECKING:
    from .etcd import EtcdStore

__all__ = ["MAX_EXHAUSTED", "MAX_STALLS", "KeyStream"]

MAX_STALLS = 6
"""Failures in a row, each without an event past the stream's revision, after which a
:class:`KeyStream` gives up (twice around a 3-member cluster)."""

MAX_EXHAUSTED = 2
"""``RESOURCE_EXHAUSTED`` failures in a row at one revision after which a :class:`KeyStream`
gives up: its answer is too big to take, and asking again from the same revision asks for the
same answer."""

_BACKOFF_S = (0.1, 2.0)
"""The pause between reopenings of a stream: the first, doubling per failure, up to the last."""

_warn = LogLimiter(3)
"""Warnings about streams giving up: at most 3 a minute per prefix."""


class KeyStream:
    """A watch stream kept open on ``prefix`` of ``store`` from ``revision + 1`` (puts only),
    keeping the newest record of each key :meth:`register`-ed (counted: several callers may
    wait for one key; ``interest`` is the first registration) and counting every other event
    in ``ignored``."""

    def __init__(self, store: EtcdStore, prefix: str, revision: int, interest: Sequence[str]):
        self.store, self.prefix = store, prefix
        self.seen = revision  # the newest revision the stream delivered
        self.interest: dict[str, int] = {}  # key -> how many callers wait for it
        self.latest: dict[str, Record] = {}  # the newest record of each such key
        self.ignored = 0  # events of keys nobody waited for
        for k in interest:
            self.interest[k] = self.interest.get(k, 0) + 1
        self.error: Exception | None = None
        self.compacted = False
        self.failed: str | None = None  # why the stream gave up (it kept failing)
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch {prefix}",
                                        daemon=True)
        self._thread.start()

    def healthy(self) -> bool:
        """Whether the stream still runs (not stopped, compacted, refused, or given up after
        failing again and again at one revision)."""
        return (not self._stopped.is_set() and self.error is None and not self.compacted
                and self.failed is None)

    def register(self, keys: Sequence[str]) -> None:
        """Keep the records of ``keys`` from now on."""
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
        order, waiting up to ``timeout`` for one; ``None`` when the stream failed (compacted,
        stopped). A refusal by RBAC is raised (a :class:`LedgerAccessError`)."""
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

    def stop(self) -> None:
        """Close the stream and end the thread."""
        self._stopped.set()
        call = self._call
        if call is not None:
            call.cancel()
        with self._cond:
            self._cond.notify_all()

    def _refused(self, reason: str) -> LedgerAccessError:
        device = self.store.device
        return LedgerAccessError(
            f"etcd refused device {device!r} a watch of {self.prefix!r} ({reason}); the device "
            f"must be enrolled (`shoal swarm enroll {device}`) and not revoked.",
            device=device, key=self.prefix)

    def _keep(self, events: Any, fragment: bool = False) -> None:
        """Keep the records of ``events`` that somebody waits for. ``fragment``: more parts of
        this answer follow, and they may hold more events of its last revision (one
        transaction's puts), so :attr:`seen` stays below that revision: a stream reopened
        before the last part came asks for it again rather than lose the rest of it."""
        with self._cond:
            kept = False
            for ev in events:
                rev = int(ev.kv.mod_revision)
                if not fragment or rev < int(events[-1].kv.mod_revision):
                    self.seen = max(self.seen, rev)
                else:
                    self.seen = max(self.seen, rev - 1)
                key = ev.kv.key.decode(errors="replace")
                if key in self.interest:
                    self.latest[key] = to_record(ev.kv)
                    kept = True
                else:
                    self.ignored += 1
            if kept:
                self._cond.notify_all()

    def _run(self) -> None:
        p = self.prefix.encode()
        n = len(self.store.endpoints)
        i = self.store._current
        stalls = exhausted = 0  # failures in a row without getting past self.seen
        while not self._stopped.is_set():
            done = threading.Event()
            start = self.seen
            why = ""
            create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=p, range_end=prefix_end(p), start_revision=self.seen + 1,
                filters=[rpc_pb2.WatchCreateRequest.NODELETE], fragment=True))

            def requests(create: Any = create, done: threading.Event = done) -> Any:
                yield create
                done.wait()  # keep the stream open until it is cancelled
            try:
                m = self.store._member(i)
                self._call = m.watch.Watch(requests(), metadata=REQUIRE_LEADER)
                for resp in self._call:
                    if resp.canceled:
                        reason = resp.cancel_reason or "cancelled by the member"
                        with self._cond:
                            if resp.compact_revision:
                                self.compacted = True
                            elif "permission denied" in reason:
                                self.error = self._refused(reason)
                            self._cond.notify_all()
                        if self.compacted or self.error is not None:
                            return
                        break
                    if resp.events:
                        self._keep(resp.events, bool(resp.fragment))
                    if self.seen > start:
                        stalls = exhausted = 0
                why = "the member ended the stream"
            except grpc.RpcError as e:  # the member failed (or we stopped): reopen elsewhere
                code = e.code() if hasattr(e, "code") else None
                why = f"{getattr(code, 'name', code)}: {e.details() if hasattr(e, 'details') else e}"
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    exhausted += 1
            except TransportError as e:
                why = str(e)
            finally:
                done.set()
                if self._call is not None:
                    self._call.cancel()
            if self._stopped.is_set():
                return
            if self.seen > start:
                stalls = exhausted = 0
            else:
                stalls += 1
            if stalls >= MAX_STALLS or exhausted >= MAX_EXHAUSTED:
                failed = (f"the watch of {self.prefix!r} failed {stalls} times in a row from "
                          f"revision {self.seen + 1} (last: {why})")
                _warn.warning(self.prefix, "etcd: %s; giving it up (it is read again and "
                              "watched from the read's revision)", failed)
                with self._cond:
                    self.failed = failed
                    self._cond.notify_all()
                return
            i = (i + 1) % n
            self._stopped.wait(min(_BACKOFF_S[0] * 2 ** max(0, stalls - 1), _BACKOFF_S[1]))
