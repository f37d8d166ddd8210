"""``NodeClient``: a client node connecting out to the coordinator and answering its requests.

The client opens the stream (it may sit behind a NAT), says HELLO with its node id, and answers
each request with its :class:`~shoal.node.Node` (the algorithm's handlers, the node's own data).
A dropped connection is retried with exponential backoff (with jitter, capped); a refusal by
the coordinator (revoked or mismatched identity, another wire version) is final and raised as a
:class:`~shoal.errors.TransportError` with the coordinator's reason.

Every failed attempt is explained in one line (:func:`connection_problem`: nothing listening,
a certificate from another CA, a host name the coordinator's certificate does not name, ...),
logged as a warning when the problem changes. BYE ends the run (the client returns its
reason); RESTART says the coordinator stopped before the run was over, so the client keeps
reconnecting for the resumed coordinator. After ``patience`` seconds without a connection the
client gives up with a :class:`~shoal.errors.TransportError` naming the last problem.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc

from ..errors import TransportError
from ..node import Node
from . import wire
from .ca import Identity
from .coordinator import FRAME_LIMIT, METHOD

__all__ = ["Backoff", "NodeClient", "connection_problem"]

log = logging.getLogger(__name__)

_FINAL = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
          grpc.StatusCode.UNIMPLEMENTED)


def connection_problem(code: grpc.StatusCode, details: str | None, address: str, *,
                       identity: Identity | None = None, server_name: str | None = None) -> str:
    """What a failed connection attempt to the coordinator at ``address`` means, in one
    sentence naming what to check (from gRPC's status ``code`` and ``details``)."""
    d = details or ""
    low = d.lower()
    host = server_name or address.rsplit(":", 1)[0]
    if code in _FINAL:
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return (f"the server at {address} is not a shoal coordinator (it has no "
                    f"shoal.Shoal/Connect method: {d}); check network.address / --address.")
        return f"the coordinator at {address} refused it: {d}"
    if "connection refused" in low:
        return (f"nothing is listening at {address} (connection refused); check "
                "network.address / --address and that `shoal serve` runs there.")
    if "resolv" in low or "domain name not found" in low or "name or service" in low:
        return (f"cannot resolve the host name in {address} ({d}); check network.address / "
                "--address.")
    if "hostname verification" in low or "peer name" in low or "no match found" in low:
        return (f"TLS: the coordinator's certificate does not name {host!r} (host-name "
                "mismatch); connect to a name given to `shoal ca init --host`, or set "
                "network.server_name to one of those names.")
    if "alert" in low and ("unknown_ca" in low or "bad_certificate" in low
                           or "certificate_unknown" in low or "certificate_revoked" in low):
        cert = f" {identity.cert}" if identity is not None else ""
        return (f"TLS: the coordinator at {address} refused this node's certificate{cert} "
                f"({d}); check that it was enrolled by the project's CA (`shoal ca enroll`).")
    if ("certificate signature" in low or "certificate_verify_failed" in low
            or "certificate verify failed" in low or "unable to get" in low
            or "self signed" in low or "self-signed" in low or "unknown ca" in low):
        ca = f" in {identity.ca}" if identity is not None else ""
        return (f"TLS: the certificate of the server at {address} was not issued by this "
                f"project's CA{ca} (certificate verify failed); check that ca.crt is the "
                "project's CA certificate and that the address is the project's coordinator.")
    if "wrong_version_number" in low or "http_request" in low or "packet length" in low:
        return (f"TLS handshake failed: the server at {address} does not speak TLS (a "
                "coordinator started with --insecure, or another service on this port?); "
                "check network.address / --address.")
    if "socket closed" in low or "connection reset" in low or "end of tcp stream" in low:
        if identity is None:
            return (f"the server at {address} closed the connection at once: the coordinator "
                    "probably requires TLS and this node runs with --insecure; drop "
                    "--insecure (network.insecure) and use this node's certificate.")
        return (f"the coordinator at {address} closed the connection during the TLS "
                f"handshake: it probably refused this node's certificate {identity.cert} (not "
                "issued by the coordinator's CA, or expired); check that it was enrolled by the "
                "project's CA (`shoal ca enroll`).")
    if "handshake" in low or "ssl" in low or "tls" in low:
        return f"TLS handshake with {address} failed ({d}); check the TLS files in tls_dir."
    if "timed out" in low or "timeout" in low or code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (f"no answer from {address} (timed out: {d}); check the address and that no "
                "firewall blocks the port.")
    return f"cannot reach the coordinator at {address} ({code.name}: {d})."


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
        patience: seconds without a connection (since the start, or since the last connection
            ended, e.g. by a RESTART) after which :meth:`run` gives up (``None``: never).

    Attributes: ``sessions`` (connections accepted so far), ``handled`` (requests answered),
    ``notices`` (the reasons of the RESTARTs received), ``problem`` (the last failed
    connection attempt, explained).
    """

    def __init__(self, address: str, node: Node, *, identity: Identity | None = None,
                 insecure: bool = False, server_name: str | None = None,
                 max_message_bytes: int = 512 << 20, chunk_size: int = 1 << 20,
                 backoff: Backoff | None = None, max_attempts: int | None = None,
                 lock: AbstractContextManager[Any] | None = None,
                 patience: float | None = None):
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
        self.patience = patience
        self.lock = lock or nullcontext()
        self.connected = threading.Event()
        self.sessions = 0
        self.handled = 0
        self.notices: list[str] = []
        self.problem: str | None = None
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
        """Serve until BYE (returns its reason) or :meth:`stop` (returns ``"stopped"``);
        reconnects on failures and after RESTART. Raises :class:`TransportError` when the
        coordinator refuses this node, or after ``max_attempts`` failed attempts in a row or
        ``patience`` seconds without a connection (naming the last problem)."""
        node = self.node.node_id
        failures = 0
        since = time.monotonic()  # when this stretch without a connection began
        while not self._stop.is_set():
            try:
                reason = self._session()
                if reason is not None:
                    return reason
                failures = 0
            except grpc.RpcError as e:
                code = e.code()
                problem = connection_problem(code, e.details(), self.address,
                                             identity=self.identity, server_name=self.server_name)
                if code in _FINAL:
                    raise TransportError(f"node {node!r}: {problem}") from None
                if self._stop.is_set():
                    break
                failures += 1
                waited = time.monotonic() - since
                if self.max_attempts is not None and failures >= self.max_attempts:
                    raise TransportError(
                        f"node {node!r}: could not connect to the coordinator at {self.address} "
                        f"after {failures} attempts ({code.name}): {problem}") from None
                if self.patience is not None and waited >= self.patience:
                    raise TransportError(
                        f"node {node!r}: could not connect to the coordinator at {self.address} "
                        f"for {waited:.0f} s (network.patience_s = {self.patience:g}; "
                        f"{code.name}): {problem}") from None
                log.log(logging.WARNING if problem != self.problem else logging.DEBUG,
                        "node %s: %s Retrying%s.", node, problem,
                        "" if self.patience is None else
                        f" for up to {max(self.patience - waited, 0):.0f} s more")
                self.problem = problem
            if self.connected.is_set():
                self.backoff.reset()
                since = time.monotonic()
            self.connected.clear()
            delay = self.backoff.next()
            if self.patience is not None:
                delay = min(delay, max(0.0, since + self.patience - time.monotonic()))
            self._stop.wait(delay)
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
                        self.problem = None
                        log.info("node %s joined the coordinator at %s", self.node.node_id,
                                 self.address)
                        continue
                    if frame.type == wire.BYE:
                        return str(frame.payload.get("reason", ""))
                    if frame.type == wire.RESTART:
                        notice = str(frame.payload.get("reason", ""))
                        self.notices.append(notice)
                        log.warning("node %s: the coordinator at %s says: %s; reconnecting "
                                    "until it is back%s.",
                                    self.node.node_id, self.address, notice,
                                    "" if self.patience is None else
                                    f" (for up to {self.patience:g} s)")
                        return None
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
                if self.connected.is_set() and e.code() not in _FINAL:
                    log.warning("node %s: lost the connection to the coordinator at %s (%s); "
                                "reconnecting.", self.node.node_id, self.address, e.details())
                    return None
                raise
            finally:
                outq.put(None)
                self._call = None
        return None
