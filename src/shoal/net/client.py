"""``NodeClient``: a client node connecting out to the coordinator and answering its requests.

The client opens the stream (it may sit behind a NAT), says HELLO with its node id, and answers
each request with its :class:`~shoal.node.Node` (the algorithm's handlers, the node's own data).
A dropped connection is retried with exponential backoff (with jitter, capped); a refusal by
the coordinator (revoked or mismatched identity, another wire version) is final and raised as a
:class:`~shoal.errors.TransportError` with the coordinator's reason.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc

from ..errors import TransportError
from ..node import Node
from . import wire
from .ca import Identity
from .coordinator import FRAME_LIMIT, METHOD

__all__ = ["Backoff", "NodeClient"]

log = logging.getLogger(__name__)

_FINAL = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
          grpc.StatusCode.UNIMPLEMENTED)


class Backoff:
    """Exponential backoff: ``initial * 2**k`` seconds, capped at ``maximum``, each delay
    multiplied by a random factor in [0.5, 1] so reconnecting clients do not stampede."""

    def __init__(self, initial: float = 0.2, maximum: float = 30.0):
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0

    def reset(self) -> None:
        """Start again from ``initial`` (after a successful connection)."""
        self.attempt = 0

    def next(self) -> float:
        """The next delay in seconds."""
        delay = min(self.maximum, self.initial * 2 ** self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)


class NodeClient:
    """Runs ``node`` against the coordinator at ``address`` until the coordinator says BYE.

    Args:
        address: the coordinator's ``host:port``.
        node: the node answering requests (its id is the id it joins under).
        identity: this node's key and certificate and the CA certificate (mutual TLS); ``None``
            with ``insecure=True`` connects in plain text.
        server_name: the name to verify in the coordinator's certificate when it differs from
            the host in ``address``.
        lock: held while the node handles a message (several nodes sharing one model replica).
        max_attempts: consecutive failed connection attempts before giving up (``None``: never).
    """

    def __init__(self, address: str, node: Node, *, identity: Identity | None = None,
                 insecure: bool = False, server_name: str | None = None,
                 max_message_bytes: int = 512 << 20, chunk_size: int = 1 << 20,
                 backoff: Backoff | None = None, max_attempts: int | None = None,
                 lock: AbstractContextManager[Any] | None = None):
        if identity is None and not insecure:
            raise TransportError("NodeClient: mutual TLS needs this node's identity (key, "
                                 "certificate, CA certificate); pass identity=..., or "
                                 "insecure=True for a local plain-text experiment.")
        self.address = address
        self.node = node
        self.identity = identity
        self.server_name = server_name
        self.max_message_bytes = max_message_bytes
        self.chunk_size = chunk_size
        self.backoff = backoff or Backoff()
        self.max_attempts = max_attempts
        self.lock = lock or nullcontext()
        self.connected = threading.Event()
        self.sessions = 0
        self.handled = 0
        self._stop = threading.Event()
        self._call: Any = None
        if identity is not None:
            key, cert, ca = identity.read()
            self._creds = grpc.ssl_channel_credentials(ca, key, cert)

    def _channel(self) -> grpc.Channel:
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", FRAME_LIMIT),
                   ("grpc.max_send_message_length", FRAME_LIMIT),
                   ("grpc.keepalive_time_ms", 20_000),
                   ("grpc.enable_retries", 0)]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        if self.identity is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, self._creds, options=options)

    def run(self) -> str:
        """Serve until BYE (returns its reason) or :meth:`stop`; reconnects on failures."""
        failures = 0
        while not self._stop.is_set():
            try:
                reason = self._session()
                if reason is not None:
                    return reason
                failures = 0
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
                if code in _FINAL:
                    raise TransportError(f"node {self.node.node_id!r}: the coordinator at "
                                         f"{self.address} refused it: {details}") from None
                if self._stop.is_set():
                    break
                failures += 1
                if self.max_attempts is not None and failures >= self.max_attempts:
                    raise TransportError(
                        f"node {self.node.node_id!r}: could not connect to the coordinator at "
                        f"{self.address} after {failures} attempts ({code.name}: {details}); "
                        "check the address, that the coordinator runs, and that this node's "
                        "certificate was issued by the project's CA.") from None
                log.info("node %s: connection failed (%s), retrying", self.node.node_id,
                         code.name)
            if self.connected.is_set():
                self.backoff.reset()
            self.connected.clear()
            self._stop.wait(self.backoff.next())
        return "stopped"

    def stop(self) -> None:
        """Disconnect and stop reconnecting."""
        self._stop.set()
        self.disconnect()

    def disconnect(self) -> None:
        """Drop the current connection (the client reconnects unless stopped)."""
        call = self._call
        if call is not None:
            call.cancel()

    def _session(self) -> str | None:
        outq: queue.Queue[Any] = queue.Queue()
        outq.put(wire.control(wire.HELLO, {"node_id": self.node.node_id}))

        def frames() -> Iterator[bytes]:
            while True:
                item = outq.get()
                if item is None:
                    return
                if isinstance(item, bytes):
                    yield item
                else:
                    yield from item

        with self._channel() as channel:
            call = channel.stream_stream(METHOD)(frames())
            self._call = call
            asm = wire.Assembler(self.max_message_bytes)
            try:
                for data in call:
                    frame = wire.decode_frame(data)
                    if frame.type == wire.WELCOME:
                        self.sessions += 1
                        self.connected.set()
                        log.info("node %s joined the coordinator at %s", self.node.node_id,
                                 self.address)
                        continue
                    if frame.type == wire.BYE:
                        return str(frame.payload.get("reason", ""))
                    done = (asm.header(frame.payload) if frame.type == wire.HEADER
                            else asm.chunk(frame.payload))
                    if done is None:
                        continue
                    seq, message = done
                    try:
                        with self.lock:
                            reply = self.node.handle(message)
                    except Exception as e:  # a failing handler is a dropout, not a crash
                        log.warning("node %s failed handling %r in round %d: %s",
                                    self.node.node_id, message.kind, message.round, e,
                                    exc_info=True)
                        reply = message.failed(f"{type(e).__name__}: {e}")
                    self.handled += 1
                    outq.put(wire.encode_message(reply, seq, self.chunk_size))
            except grpc.RpcError as e:
                if self._stop.is_set() or e.code() == grpc.StatusCode.CANCELLED:
                    return None
                raise
            finally:
                outq.put(None)
                self._call = None
        return None
