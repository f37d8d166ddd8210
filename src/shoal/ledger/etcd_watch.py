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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from aetcd.rpc import rpc_pb2

from ..errors import TransportError
from .etcd_rpc import REQUIRE_LEADER, LedgerAccessError, prefix_end, to_record
from .store import Record

if TYPE_CHECKING:
    from .etcd import EtcdStore

__all__ = ["KeyStream"]


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
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch {prefix}",
                                        daemon=True)
        self._thread.start()

    def healthy(self) -> bool:
        """Whether the stream still runs (not stopped, compacted or refused)."""
        return not self._stopped.is_set() and self.error is None and not self.compacted

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

    def _keep(self, events: Any) -> None:
        with self._cond:
            kept = False
            for ev in events:
                self.seen = max(self.seen, int(ev.kv.mod_revision))
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
        while not self._stopped.is_set():
            done = threading.Event()
            create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=p, range_end=prefix_end(p), start_revision=self.seen + 1,
                filters=[rpc_pb2.WatchCreateRequest.NODELETE]))

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
                        self._keep(resp.events)
            except (grpc.RpcError, TransportError):
                pass  # the member failed (or we stopped): reopen on the next one
            finally:
                done.set()
                if self._call is not None:
                    self._call.cancel()
            if not self._stopped.is_set():
                i = (i + 1) % n
                self._stopped.wait(0.1)
