"""``GrpcTransport``: the coordinator's side of the deployed federation.

Clients sit behind NATs and firewalls, so *they* connect: each opens one bidirectional gRPC
stream (``/shoal.Shoal/Connect``, a generic handler carrying :mod:`shoal.net.wire` frames, no
generated code) and the coordinator sends its requests down those client-initiated streams.
``GrpcTransport`` implements :class:`~shoal.transport.Transport`, so FedAvg (and any algorithm)
runs over it unchanged.

Identity: with mutual TLS (the default) the handshake refuses a client without a certificate
from the project's CA; the stream handler then reads the peer certificate from the auth context,
refuses a revoked one (the CRL is re-read when it changes; a connected node whose certificate
is revoked is disconnected at its next request), a dashboard viewer's certificate (``shoal ca
enroll NAME --viewer``: a viewer watches the dashboard and is no client) and a HELLO claiming
another id than the certificate's common name. Every reply is checked before it reaches the
algorithm: size limit (refused unread), sender bound to the TLS identity, and kind, round and
sequence number matching an outstanding request (no replay of an old round); a rejected reply
becomes an error reply with the reason logged, and the round goes on.

Limits: nothing a peer sends, enrolled or not, can exhaust the coordinator's file descriptors,
threads, memory or log; each limit is a constructor argument (see :class:`GrpcTransport`;
the file limit, the log limiter and the late grace live in :mod:`shoal.net.limits`).

* Connections: at start the coordinator raises its soft limit on open files to the hard limit
  where allowed and accepts at most ``max_connections`` TCP connections at once (by default
  the file limit less a quarter, at least 64, kept for its own files; at most 10,000); beyond
  that gRPC closes new connections at once instead of running out of descriptors. A connection
  must finish its TLS and HTTP/2 handshake within ``handshake_timeout`` seconds (an idle socket
  or a truncated ClientHello is closed then), and one that carries no stream for a minute is
  closed.
* Streams: a stream must send HELLO within ``hello_timeout`` seconds or it is aborted
  (``DEADLINE_EXCEEDED``); one certificate identity holds at most ``max_streams_per_node``
  streams at once (a reconnecting node's new stream replaces its old one after HELLO, as
  before; more are refused with ``RESOURCE_EXHAUSTED``), and all clients together at most
  ``max_streams``, below the server's thread pool, so one node cannot starve the others.
* Replies: a node whose replies are rejected more than ``max_rejections`` times within
  ``rejection_window`` seconds has its stream closed (``RESOURCE_EXHAUSTED``, with the reason);
  :attr:`GrpcTransport.rejected` keeps only the latest rejections (counts per node in
  :attr:`GrpcTransport.rejections`), and at most ``max_warnings_per_node`` warnings a minute are
  logged about one node, then one line saying how many were suppressed.
* Frames: larger than 8 MiB, or JSON nested deeper than :data:`~shoal.net.wire.MAX_JSON_DEPTH`
  levels, is refused.
* Revocation: the CRL must exist at start (``crl=None`` turns revocation off deliberately and
  says so in the log); a CRL that turns up truncated, malformed or wrongly signed while running
  keeps the last good list in force (see :class:`~shoal.net.ca.RevocationList`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ..errors import TransportError
from ..message import COORDINATOR, Message
from ..transport import Transport, timed
from . import wire
from .ca import NODE_ID_PATTERN, Identity, RevocationList, is_viewer, peer_identity
from .limits import FD_RESERVE, LateGrace, LogLimiter, default_max_connections, raise_fd_limit

__all__ = ["METHOD", "SERVICE", "GrpcTransport"]

log = logging.getLogger(__name__)

SERVICE = "shoal.Shoal"
METHOD = f"/{SERVICE}/Connect"
FRAME_LIMIT = 8 << 20
"""The largest single gRPC frame either side accepts (chunks are far smaller)."""
REJECTED_KEPT = 1000
"""How many of the latest rejections :attr:`GrpcTransport.rejected` keeps."""
IDLE_CONNECTION_MS = 60_000
"""A connection that carries no stream for this long is closed (clients always hold one)."""


def _host(context: grpc.ServicerContext) -> str:
    """The peer's address without its port (warnings about peers without an identity are
    rate-limited per host, not per connection)."""
    return str(context.peer()).rsplit(":", 1)[0]


@dataclass(frozen=True)
class _Abort:
    """An outbox item: end the stream with this gRPC status (the client is told why)."""

    code: grpc.StatusCode
    details: str


class _Pending:
    def __init__(self, request: Message):
        self.request = request
        self.reply: Message | None = None
        self.event = threading.Event()

    def set(self, reply: Message) -> None:
        if not self.event.is_set():
            self.reply = reply
            self.event.set()


class _Conn:
    """One client's stream: an outbox of frames and its outstanding requests by seq."""

    def __init__(self, node_id: str, peer: str, serial: int | None, max_rejections: int = 0):
        self.node_id = node_id
        self.peer = peer
        self.serial = serial
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.pending: dict[int, _Pending] = {}
        self.lock = threading.Lock()
        self.closed = False
        self.rejections: deque[float] = deque(maxlen=max_rejections + 1)
        """When this stream's latest rejected replies arrived (``time.monotonic()``)."""

    def close(self, reason: str, status: _Abort | None = None) -> None:
        """Fail the outstanding requests with ``reason`` and end the stream (with ``status``
        when given, so the client learns why)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            pending, self.pending = self.pending, {}
        for p in pending.values():
            p.set(p.request.failed(f"node {self.node_id!r} {reason}"))
        if status is not None:
            self.outbox.put(status)
        self.outbox.put(None)


class GrpcTransport(Transport):
    """The coordinator: a gRPC server that clients connect to; a :class:`Transport`.

    Args:
        address: ``host:port`` to listen on (port 0 picks a free port; see :attr:`port`).
        identity: the coordinator's key, certificate and the CA certificate (mutual TLS).
        crl: the CA's revocation list file, checked on every connection; it must exist
            (``shoal ca init`` writes it). ``None`` turns revocation checks off (logged).
        insecure: plain text, no identities (local experiments only; logs a warning).
        max_message_bytes: the largest reply accepted; a larger one is refused unread.
        chunk_size: bytes of tensor data per frame sent.
        max_workers: threads serving streams (one per connected client, plus a few).
        max_connections: TCP connections accepted at once; more are closed on arrival.
            ``None``: sized below the limit on open files (raised to the hard limit at start),
            keeping a quarter of it (at least 64) for the coordinator's own files.
        handshake_timeout: seconds a new connection has to finish its TLS and HTTP/2
            handshake before it is closed (an idle or half-open socket costs nothing after).
        hello_timeout: seconds a new stream has to send HELLO before it is aborted.
        max_streams: streams served at once, all clients together (``None``: ``max_workers``
            less 8); more are refused with ``RESOURCE_EXHAUSTED``.
        max_streams_per_node: streams one certificate identity may hold at once (a reconnect
            needs 2: the new stream replaces the old one after HELLO); more are refused.
        max_rejections: rejected replies (unsolicited, late, replayed, spoofed, oversized) a
            stream may send within ``rejection_window`` seconds; one more closes the stream.
        rejection_window: seconds over which ``max_rejections`` counts.
        max_warnings_per_node: warnings logged about one node per minute; the rest are
            counted and reported in one line.
    """

    quorum: int | None = None
    """Replies a round needs (``shoal serve`` sets the algorithm's ``min_replies``); with
    :attr:`late_grace_s`, once that many valid replies of a batch arrived the others get
    ``late_grace_s`` more seconds, not the whole timeout."""
    late_grace_s: float | None = None
    """See :attr:`quorum` (``None``: wait for every reply up to the timeout)."""

    def __init__(self, address: str = "127.0.0.1:0", *, identity: Identity | None = None,
                 crl: str | Path | None = None, insecure: bool = False,
                 max_message_bytes: int = 512 << 20, chunk_size: int = 1 << 20,
                 max_workers: int = 256, max_connections: int | None = None,
                 handshake_timeout: float = 10.0, hello_timeout: float = 10.0,
                 max_streams: int | None = None, max_streams_per_node: int = 2,
                 max_rejections: int = 100, rejection_window: float = 60.0,
                 max_warnings_per_node: int = 20):
        if identity is None and not insecure:
            raise TransportError("GrpcTransport: mutual TLS needs the coordinator's identity "
                                 "(key, certificate, CA certificate); pass identity=..., or "
                                 "insecure=True for a local plain-text experiment.")
        fd_limit = raise_fd_limit()
        if max_connections is None:
            max_connections = default_max_connections(fd_limit)
        if max_streams is None:
            max_streams = max(1, max_workers - 8)
        for name, value, low in (("max_connections", max_connections, 1),
                                 ("max_streams", max_streams, 1),
                                 ("max_streams_per_node", max_streams_per_node, 1),
                                 ("max_rejections", max_rejections, 0),
                                 ("max_warnings_per_node", max_warnings_per_node, 1)):
            if value < low:
                raise TransportError(f"GrpcTransport: {name}={value} is out of range; expected "
                                     f"an integer of at least {low}.")
        for name, t in (("handshake_timeout", handshake_timeout),
                        ("hello_timeout", hello_timeout), ("rejection_window", rejection_window)):
            if not t > 0:
                raise TransportError(f"GrpcTransport: {name}={t} is out of range; expected a "
                                     "positive number of seconds.")
        if max_streams > max_workers - 2:
            raise TransportError(f"GrpcTransport: max_streams={max_streams} needs more threads "
                                 f"than max_workers={max_workers} provides (one per stream, "
                                 "plus 2); raise max_workers or lower max_streams.")
        if fd_limit is not None and max_connections > fd_limit - FD_RESERVE:
            raise TransportError(
                f"GrpcTransport: max_connections={max_connections} leaves fewer than "
                f"{FD_RESERVE} of the {fd_limit} files this process may open for the "
                f"coordinator's own files; pass at most {fd_limit - FD_RESERVE}, or raise the "
                "hard limit (`ulimit -Hn`).")
        super().__init__()
        self.insecure = identity is None
        self.max_message_bytes = max_message_bytes
        self.chunk_size = chunk_size
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.hello_timeout = hello_timeout
        self.max_streams = max_streams
        self.max_streams_per_node = max_streams_per_node
        self.max_rejections = max_rejections
        self.rejection_window = rejection_window
        self.wire_bytes_down = 0
        self.wire_bytes_up = 0
        self.rejected: deque[tuple[str, str]] = deque(maxlen=REJECTED_KEPT)
        """``(node id, reason)`` of the latest :data:`REJECTED_KEPT` replies refused by the
        transport (every one is counted in :attr:`rejections`)."""
        self.rejections: Counter[str] = Counter()
        """How many replies of each node the transport refused."""
        self._conns: dict[str, _Conn] = {}
        self._cond = threading.Condition()
        self._seq = 0
        self._streams = 0
        self._streams_of: Counter[str] = Counter()
        self._warn = LogLimiter(max_warnings_per_node)
        self._crl = None
        options = [("grpc.max_receive_message_length", FRAME_LIMIT),
                   ("grpc.max_send_message_length", FRAME_LIMIT),
                   ("grpc.keepalive_time_ms", 20_000),
                   ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.max_allowed_incoming_connections", max_connections),
                   ("grpc.server_handshake_timeout_ms", max(1, round(handshake_timeout * 1000))),
                   ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS)]
        # gRPC's own bound (a bare RESOURCE_EXHAUSTED) stays behind ours (which says why).
        self._server = grpc.server(ThreadPoolExecutor(max_workers=max_workers),
                                   options=options,
                                   maximum_concurrent_rpcs=min(max_workers - 2, max_streams + 4))
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Connect": grpc.stream_stream_rpc_method_handler(self._connect)})
        self._server.add_generic_rpc_handlers((handler,))
        if identity is None:
            log.warning("coordinator listening WITHOUT TLS on %s (--insecure): anyone who can "
                        "reach this port can join under any id; use only for local experiments.",
                        address)
            self.port = self._server.add_insecure_port(address)
        else:
            key, cert, ca = identity.read()
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                require_client_auth=True)
            if crl is not None:
                self._crl = RevocationList(crl, identity.ca)
            else:
                log.warning("revocation checks are OFF (crl=None): a node whose certificate was "
                            "revoked can still join; pass crl=<CA directory>/crl.pem to refuse "
                            "revoked certificates.")
            self.port = self._server.add_secure_port(address, creds)
        if not self.port:
            raise TransportError(f"GrpcTransport: cannot listen on {address!r}; is the port "
                                 "in use or the host name wrong?")
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"
        self._server.start()

    # -- Transport --------------------------------------------------------------------------

    def nodes(self) -> list[str]:
        """The ids of the clients connected now, sorted."""
        with self._cond:
            return sorted(i for i, c in self._conns.items() if not c.closed)

    def wait_for_nodes(self, count: int, timeout: float | None = None) -> bool:
        """Block until at least ``count`` clients are connected (``False`` on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self.nodes()) < count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is None else min(left, 1.0))
        return True

    def request(self, messages: Sequence[Message], timeout: float | None = None) -> list[Message]:
        """Send ``messages`` down their clients' streams; one reply per message, in order."""
        return list(self.stream(messages, timeout))

    def stream(self, messages: Sequence[Message],
               timeout: float | None = None) -> Iterator[Message]:
        """Send every message now; yield the replies in order as they arrive (or fail)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        sent = [self._send(m) for m in messages]
        grace = LateGrace(self.quorum, self.late_grace_s,
                           [p for p in sent if isinstance(p, _Pending)])

        def gen() -> Iterator[Message]:
            for m, p in zip(messages, sent, strict=True):
                if isinstance(p, Message):
                    reply = p
                elif grace.wait(p, deadline):
                    assert p.reply is not None
                    reply = p.reply
                else:
                    reply = m.failed(
                        f"timed out: no reply {self.late_grace_s:g} s after {self.quorum} "
                        "others had answered (late_grace_s)" if grace.expired()
                        else f"timed out: no reply within {timeout:g} s")
                    self._forget(m.dst, p)
                self.record(m, reply)
                yield reply
        return timed(self, gen())

    def close(self, reason: str = "the run is finished", grace: float = 2.0, *,
              restart: bool = False) -> None:
        """Tell every connected client ``reason`` and stop the server.

        By default the run is over: the clients get BYE and exit. With ``restart=True`` this
        coordinator stops *before* the run is over (a crash, Ctrl-C, SIGTERM; its last
        checkpoint stays): the clients get RESTART and keep reconnecting, up to their
        ``network.patience_s``, for the coordinator that ``shoal serve --resume`` starts."""
        kind = wire.RESTART if restart else wire.BYE
        with self._cond:
            conns = list(self._conns.values())
        for c in conns:
            c.outbox.put(wire.control(kind, {"reason": reason}))
            c.outbox.put(None)
        self._server.stop(grace).wait()

    # -- internals --------------------------------------------------------------------------

    def _send(self, message: Message) -> _Pending | Message:
        with self._cond:
            conn = self._conns.get(message.dst)
            self._seq += 1
            seq = self._seq
        if conn is None:
            return message.failed(f"node {message.dst!r} is not connected")
        if self._crl is not None and conn.serial in self._crl.serials():
            self._warn.warning(conn.node_id, "closing the stream of node %s: its certificate "
                               "was revoked", conn.node_id)
            conn.close("was revoked", _Abort(grpc.StatusCode.PERMISSION_DENIED,
                                             f"the certificate of node {conn.node_id!r} (serial "
                                             f"{conn.serial:x}) is revoked; ask the project's "
                                             "CA to enroll this node again."))
            return message.failed(f"node {message.dst!r}: its certificate was revoked")
        p = _Pending(message)
        with conn.lock:
            if conn.closed:
                return message.failed(f"node {message.dst!r} is not connected")
            conn.pending[seq] = p
        conn.outbox.put((seq, message))
        return p

    def _forget(self, node_id: str, pending: _Pending) -> None:
        with self._cond:
            conn = self._conns.get(node_id)
        if conn is not None:
            with conn.lock:
                for seq, p in list(conn.pending.items()):
                    if p is pending:
                        del conn.pending[seq]

    def _authenticate(self, context: grpc.ServicerContext) -> tuple[str | None, int | None]:
        """The TLS identity (node id, serial) of the peer (``None`` in insecure mode); aborts
        when revoked, or when the certificate is a dashboard viewer's (a viewer is not a
        client)."""
        if self.insecure:
            return None, None
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert")
        if not pems:  # the handshake requires a certificate; this is a second line of defence
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "no client certificate; enroll with `shoal ca enroll NODE_ID`.")
        node_id, serial = peer_identity(pems[0])
        if self._crl is not None and serial in self._crl.serials():
            self._warn.warning(node_id, "refused %s: certificate of node %r (serial %x) is "
                               "revoked", context.peer(), node_id, serial)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the certificate of node {node_id!r} (serial {serial:x}) is revoked; "
                          "ask the project's CA to enroll this node again.")
        if is_viewer(pems[0]):
            self._warn.warning(node_id, "refused %s: the certificate of %r (serial %x) is a "
                               "dashboard viewer's, not a client's", context.peer(), node_id,
                               serial)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the certificate of {node_id!r} is a dashboard viewer's certificate "
                          "(`shoal ca enroll NAME --viewer`), and a viewer cannot join training "
                          "as a client; enroll the node with `shoal ca enroll NODE_ID` (without "
                          "--viewer) and join with that certificate.")
        return node_id, serial

    def _admit(self, context: grpc.ServicerContext, cert_id: str | None) -> Callable[[], None]:
        """Count a new stream against ``max_streams`` and its identity's
        ``max_streams_per_node`` (aborting it when over either); returns the idempotent
        release of its place."""
        with self._cond:
            total, mine = self._streams, self._streams_of[cert_id] if cert_id else 0
            over_total = total >= self.max_streams
            over_mine = cert_id is not None and mine >= self.max_streams_per_node
            if not over_total and not over_mine:
                self._streams += 1
                if cert_id is not None:
                    self._streams_of[cert_id] += 1
        if over_mine:
            self._warn.warning(str(cert_id), "refused a stream of node %s from %s: it holds %d "
                               "streams already (max_streams_per_node)", cert_id,
                               context.peer(), mine)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"node {cert_id!r} already holds {mine} streams to the coordinator, "
                          f"the most one node may hold at once (max_streams_per_node="
                          f"{self.max_streams_per_node}); close the others, or wait for them "
                          "to time out, before opening another.")
        if over_total:
            self._warn.warning(cert_id or _host(context), "refused a stream from %s: %d streams "
                               "are open, the limit (max_streams)", context.peer(), total)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the coordinator serves {total} streams, its limit (max_streams="
                          f"{self.max_streams}); try again later.")
        released = threading.Event()

        def release() -> None:
            with self._cond:
                if released.is_set():
                    return
                released.set()
                self._streams -= 1
                if cert_id is not None:
                    self._streams_of[cert_id] -= 1
                    if self._streams_of[cert_id] <= 0:
                        del self._streams_of[cert_id]
        return release

    def _first_frame(self, requests: Iterator[bytes], context: grpc.ServicerContext,
                     who: str) -> bytes | None:
        """The stream's first frame, read by a helper thread so that a stream sending nothing
        is aborted after ``hello_timeout`` seconds (``None`` when the stream ended)."""
        box: queue.Queue[bytes | None] = queue.Queue(maxsize=1)

        def first() -> None:
            try:
                box.put(next(requests))
            except Exception:  # noqa: BLE001 - StopIteration or RpcError: the stream ended
                box.put(None)

        threading.Thread(target=first, daemon=True, name="shoal-hello").start()
        try:
            return box.get(timeout=self.hello_timeout)
        except queue.Empty:
            self._warn.warning(who, "closed a stream from %s (%s): no HELLO within %g s "
                               "(hello_timeout)", context.peer(), who, self.hello_timeout)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no HELLO frame within {self.hello_timeout:g} s of opening the "
                          "stream (the coordinator's hello_timeout); a client sends HELLO "
                          "{node_id} as the first frame of its stream.")
            raise  # not reached: abort raises

    def _connect(self, requests: Iterator[bytes], context: grpc.ServicerContext,
                 ) -> Iterator[bytes]:
        cert_id, serial = self._authenticate(context)
        release = self._admit(context, cert_id)
        context.add_callback(release)
        try:
            yield from self._session(requests, context, cert_id, serial)
        finally:
            release()

    def _session(self, requests: Iterator[bytes], context: grpc.ServicerContext,
                 cert_id: str | None, serial: int | None) -> Iterator[bytes]:
        data = self._first_frame(requests, context, cert_id or _host(context))
        if data is None:
            return
        try:
            hello = wire.decode_frame(data)
        except TransportError as e:
            self._warn.warning(cert_id or _host(context), "refused %s: %s", context.peer(), e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if hello.type != wire.HELLO or not isinstance(hello.payload, dict):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "wire: the first frame of a stream must be HELLO {node_id}.")
        claimed = str(hello.payload.get("node_id", ""))
        if cert_id is not None and claimed != cert_id:
            self._warn.warning(cert_id, "refused %s: claims id %r but its certificate is for %r",
                               context.peer(), claimed, cert_id)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"node claims id {claimed!r} but its certificate is for {cert_id!r}; "
                          "a node can only join under the id it was enrolled with.")
        if not NODE_ID_PATTERN.match(claimed) or claimed == COORDINATOR:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"node id {claimed!r} is not allowed; expected 1-64 letters, digits, "
                          "'.', '_' or '-', and not 'coordinator'.")
        conn = _Conn(claimed, context.peer(), serial, self.max_rejections)
        with self._cond:
            old = self._conns.get(claimed)
            self._conns[claimed] = conn
            self._cond.notify_all()
        if old is not None:
            old.close("reconnected on a new stream")
        context.add_callback(lambda: conn.close("disconnected"))
        log.info("node %s connected from %s", claimed, conn.peer)
        reader = threading.Thread(target=self._read, args=(conn, requests), daemon=True,
                                  name=f"shoal-read-{claimed}")
        reader.start()
        try:
            yield wire.control(wire.WELCOME, {"node_id": claimed})
            while True:
                item = conn.outbox.get()
                if item is None:
                    break
                if isinstance(item, _Abort):
                    context.abort(item.code, item.details)
                if isinstance(item, bytes):
                    self.wire_bytes_down += len(item)
                    yield item
                    continue
                seq, message = item
                for frame in wire.encode_message(message, seq, self.chunk_size):
                    self.wire_bytes_down += len(frame)
                    yield frame
        finally:
            conn.close("disconnected")
            with self._cond:
                if self._conns.get(claimed) is conn:
                    del self._conns[claimed]
                self._cond.notify_all()
            self._warn.flush(claimed)
            log.info("node %s disconnected", claimed)

    def _read(self, conn: _Conn, requests: Iterator[bytes]) -> None:
        asm = wire.Assembler(self.max_message_bytes)
        try:
            for data in requests:
                if conn.closed:  # closed by the coordinator (revoked, too many rejections)
                    break
                self.wire_bytes_up += len(data)
                frame = wire.decode_frame(data)
                if frame.type == wire.HEADER:
                    try:
                        done = asm.header(frame.payload)
                    except TransportError as e:
                        seq = frame.payload.get("seq") if isinstance(frame.payload, dict) else None
                        self._reject(conn, seq, str(e))
                        if not asm.skip:
                            raise
                        continue
                elif frame.type == wire.CHUNK:
                    done = asm.chunk(frame.payload)
                else:
                    raise TransportError(f"wire: unexpected frame type {frame.type} from a "
                                         "client after HELLO.")
                if done is not None:
                    self._deliver(conn, *done)
        except TransportError as e:
            self._warn.warning(conn.node_id, "closing the stream of node %s: %s", conn.node_id, e)
        except grpc.RpcError:
            pass
        except Exception:  # a reader thread must never die silently
            log.exception("reading from node %s failed", conn.node_id)
        finally:
            conn.close("disconnected")

    def _reject(self, conn: _Conn, seq: Any, reason: str) -> None:
        now = time.monotonic()
        with conn.lock:
            p = conn.pending.pop(seq, None) if isinstance(seq, int) else None
            conn.rejections.append(now)
            while now - conn.rejections[0] > self.rejection_window:
                conn.rejections.popleft()
            flood = len(conn.rejections) > self.max_rejections
        rnd = p.request.round if p is not None else "?"
        self._warn.warning(conn.node_id, "round %s: rejected reply from %s: %s", rnd,
                           conn.node_id, reason)
        with self._cond:
            self.rejected.append((conn.node_id, reason))
            self.rejections[conn.node_id] += 1
        if p is not None:
            p.set(p.request.failed(f"rejected: {reason}"))
        if flood and not conn.closed:
            why = (f"the coordinator closed the stream of node {conn.node_id!r}: more than "
                   f"{self.max_rejections} of its replies were rejected within "
                   f"{self.rejection_window:g} s (max_rejections; the last: {reason}); answer "
                   "each of the coordinator's requests once, with the request's kind and "
                   "round.")
            log.warning("%s", why)
            conn.close("sent too many rejected replies",
                       _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why))

    def _deliver(self, conn: _Conn, seq: int, reply: Message) -> None:
        with conn.lock:
            p = conn.pending.get(seq)
        if p is None:
            self._reject(conn, None, f"{reply.kind!r} round {reply.round} (seq {seq}) answers "
                                     "no outstanding request: a late, replayed or unsolicited "
                                     "reply")
            return
        req = p.request
        reason = None
        if reply.src != conn.node_id:
            reason = (f"sender claims to be {reply.src!r} but the stream belongs to "
                      f"{conn.node_id!r}")
        elif reply.dst != req.src:
            reason = f"reply is addressed to {reply.dst!r}, expected {req.src!r}"
        elif reply.kind != req.kind or reply.round != req.round:
            reason = (f"reply is for {reply.kind!r} round {reply.round}, the request was "
                      f"{req.kind!r} round {req.round} (a stale or replayed reply)")
        if reason is not None:
            self._reject(conn, seq, reason)
            return
        with conn.lock:
            conn.pending.pop(seq, None)
        p.set(reply)
