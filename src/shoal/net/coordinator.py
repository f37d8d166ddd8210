"""``GrpcTransport``: the coordinator's side of the deployed federation.

Clients sit behind NATs and firewalls, so *they* connect: each opens one bidirectional gRPC
stream (``/shoal.Shoal/Connect``, a generic handler carrying :mod:`shoal.net.wire` frames, no
generated code) and the coordinator sends its requests down those client-initiated streams.
``GrpcTransport`` implements :class:`~shoal.transport.Transport`, so FedAvg (and any algorithm)
runs over it unchanged.

Identity: with mutual TLS (the default) the handshake refuses a client without a certificate
from the project's CA; the stream handler then reads the peer certificate from the auth context,
refuses a revoked one (the CRL is re-read when it changes; a connected node whose certificate
is revoked is disconnected at its next request) and a HELLO claiming another id than the
certificate's common name. Every reply is checked before it reaches the algorithm: size
limit (refused unread), sender bound to the TLS identity, and kind, round and sequence number
matching an outstanding request (no replay of an old round); a rejected reply becomes an error
reply with the reason logged, and the round goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from ..errors import TransportError
from ..message import COORDINATOR, Message
from ..transport import Transport, timed
from . import wire
from .ca import NODE_ID_PATTERN, Identity, RevocationList, peer_identity

__all__ = ["METHOD", "SERVICE", "GrpcTransport"]

log = logging.getLogger(__name__)

SERVICE = "shoal.Shoal"
METHOD = f"/{SERVICE}/Connect"
FRAME_LIMIT = 8 << 20
"""The largest single gRPC frame either side accepts (chunks are far smaller)."""


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

    def __init__(self, node_id: str, peer: str, serial: int | None):
        self.node_id = node_id
        self.peer = peer
        self.serial = serial
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.pending: dict[int, _Pending] = {}
        self.lock = threading.Lock()
        self.closed = False

    def close(self, reason: str) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            pending, self.pending = self.pending, {}
        for p in pending.values():
            p.set(p.request.failed(f"node {self.node_id!r} {reason}"))
        self.outbox.put(None)


class GrpcTransport(Transport):
    """The coordinator: a gRPC server that clients connect to; a :class:`Transport`.

    Args:
        address: ``host:port`` to listen on (port 0 picks a free port; see :attr:`port`).
        identity: the coordinator's key, certificate and the CA certificate (mutual TLS).
        crl: the CA's revocation list file, checked on every connection.
        insecure: plain text, no identities (local experiments only; logs a warning).
        max_message_bytes: the largest reply accepted; a larger one is refused unread.
        chunk_size: bytes of tensor data per frame sent.
        max_workers: threads serving streams (one per connected client, plus a few).
    """

    def __init__(self, address: str = "127.0.0.1:0", *, identity: Identity | None = None,
                 crl: str | Path | None = None, insecure: bool = False,
                 max_message_bytes: int = 512 << 20, chunk_size: int = 1 << 20,
                 max_workers: int = 256):
        if identity is None and not insecure:
            raise TransportError("GrpcTransport: mutual TLS needs the coordinator's identity "
                                 "(key, certificate, CA certificate); pass identity=..., or "
                                 "insecure=True for a local plain-text experiment.")
        super().__init__()
        self.insecure = identity is None
        self.max_message_bytes = max_message_bytes
        self.chunk_size = chunk_size
        self.wire_bytes_down = 0
        self.wire_bytes_up = 0
        self.rejected: list[tuple[str, str]] = []
        """``(node id, reason)`` of every reply refused by the transport."""
        self._conns: dict[str, _Conn] = {}
        self._cond = threading.Condition()
        self._seq = 0
        self._crl = None
        options = [("grpc.max_receive_message_length", FRAME_LIMIT),
                   ("grpc.max_send_message_length", FRAME_LIMIT),
                   ("grpc.keepalive_time_ms", 20_000),
                   ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                   ("grpc.keepalive_permit_without_calls", 1)]
        self._server = grpc.server(ThreadPoolExecutor(max_workers=max_workers),
                                   options=options, maximum_concurrent_rpcs=max_workers - 4)
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

        def gen() -> Iterator[Message]:
            for m, p in zip(messages, sent, strict=True):
                if isinstance(p, Message):
                    reply = p
                else:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if p.event.wait(left):
                        assert p.reply is not None
                        reply = p.reply
                    else:
                        reply = m.failed(f"timed out: no reply within {timeout:g} s")
                        self._forget(m.dst, p)
                self.record(m, reply)
                yield reply
        return timed(self, gen())

    def close(self, reason: str = "the run is finished", grace: float = 2.0) -> None:
        """Say BYE to every client and stop the server."""
        with self._cond:
            conns = list(self._conns.values())
        for c in conns:
            c.outbox.put(wire.control(wire.BYE, {"reason": reason}))
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
            log.warning("closing the stream of node %s: its certificate was revoked",
                        conn.node_id)
            conn.close("was revoked")
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
        when revoked."""
        if self.insecure:
            return None, None
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert")
        if not pems:  # the handshake requires a certificate; this is a second line of defence
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "no client certificate; enroll with `shoal ca enroll NODE_ID`.")
        node_id, serial = peer_identity(pems[0])
        if self._crl is not None and serial in self._crl.serials():
            log.warning("refused %s: certificate of node %r (serial %x) is revoked",
                        context.peer(), node_id, serial)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the certificate of node {node_id!r} (serial {serial:x}) is revoked; "
                          "ask the project's CA to enroll this node again.")
        return node_id, serial

    def _connect(self, requests: Iterator[bytes], context: grpc.ServicerContext,
                 ) -> Iterator[bytes]:
        cert_id, serial = self._authenticate(context)
        try:
            hello = wire.decode_frame(next(requests))
        except StopIteration:
            return
        except TransportError as e:
            log.warning("refused %s: %s", context.peer(), e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if hello.type != wire.HELLO or not isinstance(hello.payload, dict):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "wire: the first frame of a stream must be HELLO {node_id}.")
        claimed = str(hello.payload.get("node_id", ""))
        if cert_id is not None and claimed != cert_id:
            log.warning("refused %s: claims id %r but its certificate is for %r",
                        context.peer(), claimed, cert_id)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"node claims id {claimed!r} but its certificate is for {cert_id!r}; "
                          "a node can only join under the id it was enrolled with.")
        if not NODE_ID_PATTERN.match(claimed) or claimed == COORDINATOR:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"node id {claimed!r} is not allowed; expected 1-64 letters, digits, "
                          "'.', '_' or '-', and not 'coordinator'.")
        conn = _Conn(claimed, context.peer(), serial)
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
            log.info("node %s disconnected", claimed)

    def _read(self, conn: _Conn, requests: Iterator[bytes]) -> None:
        asm = wire.Assembler(self.max_message_bytes)
        try:
            for data in requests:
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
            log.warning("closing the stream of node %s: %s", conn.node_id, e)
        except grpc.RpcError:
            pass
        except Exception:  # a reader thread must never die silently
            log.exception("reading from node %s failed", conn.node_id)
        finally:
            conn.close("disconnected")

    def _reject(self, conn: _Conn, seq: Any, reason: str) -> None:
        with conn.lock:
            p = conn.pending.pop(seq, None) if isinstance(seq, int) else None
        rnd = p.request.round if p is not None else "?"
        log.warning("round %s: rejected reply from %s: %s", rnd, conn.node_id, reason)
        self.rejected.append((conn.node_id, reason))
        if p is not None:
            p.set(p.request.failed(f"rejected: {reason}"))

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
