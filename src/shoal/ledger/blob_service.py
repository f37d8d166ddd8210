"""The blob service: a peer's weights blobs served to its peers over mutual TLS, and fetched.

* :class:`BlobServer`: serves a :class:`~shoal.ledger.blobs.BlobStore` over gRPC
  (``/shoal.Blobs/Fetch``), with mutual TLS.
* :class:`BlobClient` / :func:`fetch_blob`: fetch a blob and verify its hash.

Fetch protocol: the request is JSON ``{"sha256": HEX}`` (at most :data:`MAX_REQUEST_BYTES`);
the response stream is one JSON message ``{"protocol": 1, "sha256": HEX, "nbytes": N}`` and
then the blob in chunks of at most :data:`CHUNK_BYTES` (1 MiB), far below gRPC's 4 MB message
limit, so a model of any size passes. Mutual TLS gives access control (only certificates of
the project's CA, not revoked, not a dashboard viewer's, and accepted by the server's
``allowed`` check, may fetch); the hash gives integrity, so a fetcher need not trust which
peer served the blob.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import grpc

from ..errors import TransportError
from ..net.ca import Identity, RevocationList, is_viewer, peer_identity
from ..net.limits import LogLimiter
from .blobs import SHA256_PATTERN, BlobError, BlobStore, blob_hash

__all__ = ["CHUNK_BYTES", "MAX_REQUEST_BYTES", "METHOD", "SERVICE", "BlobClient", "BlobServer",
           "fetch_blob"]

log = logging.getLogger(__name__)

SERVICE = "shoal.Blobs"
METHOD = f"/{SERVICE}/Fetch"
PROTOCOL = 1
"""The version of the fetch protocol (the first response message names it)."""
CHUNK_BYTES = 1 << 20
"""Blob bytes per response message."""
MAX_REQUEST_BYTES = 1024
"""The largest fetch request the server reads (gRPC refuses a larger one unread)."""
_MAX_RESPONSE_HEAD = 4096
_RECEIVE_LIMIT = CHUNK_BYTES + (64 << 10)


# -- the server ---------------------------------------------------------------------------------


def _host(context: grpc.ServicerContext) -> str:
    return str(context.peer()).rsplit(":", 1)[0]


class BlobServer:
    """Serves a :class:`BlobStore` to the swarm's peers over gRPC with mutual TLS.

    One method, ``/shoal.Blobs/Fetch`` (see the module docstring for the protocol). A fetch
    is refused (and the fetcher told why) when: the client has no certificate of the
    project's CA (the TLS handshake fails); its certificate is revoked (``crl``, re-read when
    it changes; ``PERMISSION_DENIED``); ``allowed(node_id)`` returns a reason (the swarm
    passes "is this device enrolled and not revoked on the ledger"; an exception in it also
    refuses, so a failing check never lets anyone in; ``PERMISSION_DENIED``); the request is
    malformed or over :data:`MAX_REQUEST_BYTES` (``INVALID_ARGUMENT`` /
    ``RESOURCE_EXHAUSTED``); the store does not hold the blob (``NOT_FOUND``); or the server
    already serves ``max_streams`` fetches, or ``max_streams_per_node`` of this certificate's
    (``RESOURCE_EXHAUSTED``).

    Args:
        store: the blobs to serve.
        identity: this peer's key and certificate (issued with ``server=True`` for the host
            names fetchers connect to) and the project's CA certificate.
        host, port: where to listen (port 0 picks a free port; see :attr:`address`).
        crl: the CA's revocation list file (it must exist); ``None`` turns revocation checks
            off (logged).
        allowed: ``node_id -> None`` (allowed) or the reason it is refused.
        max_connections: TCP connections accepted at once; more are closed on arrival.
        max_streams: fetches served at once, all peers together.
        max_streams_per_node: fetches one certificate identity may run at once.
        stream_timeout: seconds one fetch may take; a slower one is cancelled, so a client
            that stops reading cannot hold a server thread.
        handshake_timeout: seconds a new connection has to finish its TLS handshake.
        max_warnings_per_node: refusals logged per peer per minute (then counted).
    """

    def __init__(self, store: BlobStore, identity: Identity, *, host: str = "127.0.0.1",
                 port: int = 0, crl: str | Path | None,
                 allowed: Callable[[str], str | None] | None = None,
                 max_connections: int = 256, max_streams: int = 16,
                 max_streams_per_node: int = 4, stream_timeout: float = 300.0,
                 handshake_timeout: float = 10.0, max_warnings_per_node: int = 20):
        for name, value in (("max_connections", max_connections), ("max_streams", max_streams),
                            ("max_streams_per_node", max_streams_per_node),
                            ("max_warnings_per_node", max_warnings_per_node)):
            if value < 1:
                raise TransportError(f"BlobServer: {name}={value} is out of range; expected "
                                     "an integer of at least 1.")
        for name, t in (("stream_timeout", stream_timeout),
                        ("handshake_timeout", handshake_timeout)):
            if not t > 0:
                raise TransportError(f"BlobServer: {name}={t} is out of range; expected a "
                                     "positive number of seconds.")
        self.store = store
        self.allowed = allowed
        self.max_streams = max_streams
        self.max_streams_per_node = max_streams_per_node
        self.stream_timeout = stream_timeout
        self.served = 0
        """Fetches served to the end."""
        self.bytes_served = 0
        """Blob bytes sent by fetches served to the end."""
        self._lock = threading.Lock()
        self._streams = 0
        self._streams_of: Counter[str] = Counter()
        self._warn = LogLimiter(max_warnings_per_node)
        self._crl: RevocationList | None = None
        if crl is not None:
            self._crl = RevocationList(crl, identity.ca)
        else:
            log.warning("blob server: revocation checks are OFF (crl=None): a peer whose "
                        "certificate was revoked can still fetch blobs; pass crl=<CA "
                        "directory>/crl.pem.")
        key, cert, ca = identity.read()
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                            require_client_auth=True)
        options = [("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                   ("grpc.max_send_message_length", _RECEIVE_LIMIT),
                   ("grpc.max_allowed_incoming_connections", max_connections),
                   ("grpc.server_handshake_timeout_ms", max(1, round(handshake_timeout * 1000))),
                   ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                   ("grpc.max_connection_idle_ms", 60_000)]
        self._server = grpc.server(ThreadPoolExecutor(max_workers=max_streams + 4,
                                                      thread_name_prefix="shoal-blobs"),
                                   options=options, maximum_concurrent_rpcs=max_streams + 2)
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Fetch": grpc.unary_stream_rpc_method_handler(self._fetch)})
        self._server.add_generic_rpc_handlers((handler,))
        where = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.port = self._server.add_secure_port(f"{where}:{port}", creds)
        """The port listened on (the one chosen when ``port=0``)."""
        if not self.port:
            raise TransportError(f"BlobServer: cannot listen on {where}:{port}; is the port "
                                 "in use or the host name wrong?")
        self.address = f"{where}:{self.port}"
        """``host:port`` fetchers connect to (the port chosen when ``port=0``)."""
        self._server.start()

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving; fetches in progress get ``grace`` seconds to finish."""
        self._server.stop(grace).wait()

    def __enter__(self) -> BlobServer:
        """The server itself (already serving)."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop the server."""
        self.stop()

    # -- internals ------------------------------------------------------------------------------

    def _refuse(self, context: grpc.ServicerContext, who: str, code: grpc.StatusCode,
                details: str) -> NoReturn:
        self._warn.warning(who, "blob server: refused a fetch from %s (%s): %s",
                           context.peer(), who, details)
        context.abort(code, details)
        raise AssertionError("not reached: abort raises")

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:  # the handshake requires a certificate; a second line of defence
            self._refuse(context, _host(context), grpc.StatusCode.UNAUTHENTICATED,
                         "no client certificate; a peer fetches with its certificate from "
                         "the project's CA.")
        try:
            node_id, serial = peer_identity(pems[0])
        except (TransportError, ValueError) as e:
            self._refuse(context, _host(context), grpc.StatusCode.UNAUTHENTICATED, str(e))
        if is_viewer(pems[0]):
            # A viewer's certificate comes from the same CA and may carry a device's name
            # (CN); it opens the dashboard, never a swarm's blobs.
            self._refuse(context, node_id, grpc.StatusCode.PERMISSION_DENIED,
                         f"the certificate of {node_id!r} is a dashboard viewer's certificate "
                         "(`shoal ca enroll NAME --viewer`), and a viewer is no swarm device: "
                         "it may not fetch blobs. Fetch with the device's own certificate "
                         "(`shoal swarm enroll DEVICE`).")
        if self._crl is not None and serial in self._crl.serials():
            self._refuse(context, node_id, grpc.StatusCode.PERMISSION_DENIED,
                         f"the certificate of node {node_id!r} (serial {serial:x}) is revoked; "
                         "ask the project's CA to enroll this node again.")
        if self.allowed is not None:
            try:
                reason = self.allowed(node_id)
            except Exception as e:  # noqa: BLE001 - a failing check refuses, never admits
                log.warning("blob server: the allowed(%r) check failed", node_id, exc_info=True)
                reason = f"the peer could not check it ({type(e).__name__}: {e})"
            if reason is not None:
                self._refuse(context, node_id, grpc.StatusCode.PERMISSION_DENIED,
                             f"node {node_id!r} may not fetch blobs from this peer: {reason}")
        return node_id

    def _admit(self, context: grpc.ServicerContext, node_id: str) -> Callable[[], None]:
        with self._lock:
            total, mine = self._streams, self._streams_of[node_id]
            ok = total < self.max_streams and mine < self.max_streams_per_node
            if ok:
                self._streams += 1
                self._streams_of[node_id] += 1
        if not ok:
            if mine >= self.max_streams_per_node:
                why = (f"node {node_id!r} already runs {mine} fetches from this peer, the most "
                       f"one node may run at once (max_streams_per_node="
                       f"{self.max_streams_per_node}); wait for them to finish.")
            else:
                why = (f"this peer serves {total} fetches, its limit (max_streams="
                       f"{self.max_streams}); try again later.")
            self._refuse(context, node_id, grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if done.is_set():
                    return
                done.set()
                self._streams -= 1
                self._streams_of[node_id] -= 1
                if self._streams_of[node_id] <= 0:
                    del self._streams_of[node_id]
        return release

    @staticmethod
    def _parse(request: bytes) -> str | None:
        try:
            body = json.loads(request)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(body, dict) or set(body) != {"sha256"}:
            return None
        sha = body["sha256"]
        return sha if isinstance(sha, str) and SHA256_PATTERN.match(sha) else None

    def _fetch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        node_id = self._authenticate(context)
        sha = self._parse(request)
        if sha is None:
            self._refuse(context, node_id, grpc.StatusCode.INVALID_ARGUMENT,
                         f"malformed fetch request ({len(request)} bytes); expected JSON "
                         '{"sha256": "<64 lower-case hex digits>"}.')
        release = self._admit(context, node_id)
        context.add_callback(release)
        timer = threading.Timer(self.stream_timeout, context.cancel)
        timer.daemon = True
        context.add_callback(timer.cancel)
        try:
            data = self.store.get(sha)
            if data is None:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"this peer holds no blob with SHA-256 {sha} (never stored here, "
                              "or evicted since).")
                return
            timer.start()
            started = time.monotonic()
            yield json.dumps({"protocol": PROTOCOL, "sha256": sha, "nbytes": len(data)},
                             separators=(",", ":")).encode()
            view = memoryview(data)
            for pos in range(0, len(data), CHUNK_BYTES):
                yield bytes(view[pos:pos + CHUNK_BYTES])
            with self._lock:
                self.served += 1
                self.bytes_served += len(data)
            log.debug("blob server: sent %s (%d bytes) to %s in %.2f s", sha, len(data),
                      node_id, time.monotonic() - started)
        finally:
            timer.cancel()
            release()


# -- the client ---------------------------------------------------------------------------------


def _fetch_problem(e: grpc.RpcError, address: str, sha: str, identity: Identity,
                   timeout: float) -> TransportError:
    """What a failed fetch means, as the error to raise."""
    code, d = e.code(), e.details() or ""
    low = d.lower()
    what = f"fetching blob {sha} from the peer at {address}"
    if code == grpc.StatusCode.NOT_FOUND:
        return BlobError(f"{what}: not found: {d}", address=address, sha256=sha)
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INVALID_ARGUMENT):
        return TransportError(f"{what}: the peer refused it: {d}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return TransportError(f"{what}: the peer is busy or the message too large: {d}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return TransportError(f"{what}: the server there is not a shoal blob server (no "
                              f"{METHOD} method: {d}); check the endpoint on the ledger.")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TransportError(f"{what}: timed out after {timeout:g} s ({d}); the peer is slow "
                              "or unreachable, or the blob too large for the timeout.")
    if code == grpc.StatusCode.CANCELLED:
        return TransportError(f"{what}: cancelled ({d}); the peer stopped the stream (its "
                              "stream_timeout, or it shut down).")
    if "connection refused" in low:
        return TransportError(f"{what}: nothing is listening there (connection refused); "
                              "the peer is down or its endpoint on the ledger is stale.")
    if "hostname verification" in low or "peer name" in low or "no match found" in low:
        return TransportError(f"{what}: TLS: the peer's certificate does not name the host "
                              "in its address (host-name mismatch); issue its certificate for "
                              "that host, or pass server_name.")
    if ("certificate signature" in low or "certificate_verify_failed" in low
            or "certificate verify failed" in low or "unable to get" in low
            or "self signed" in low or "self-signed" in low or "unknown ca" in low
            or "unknown_ca" in low):
        return TransportError(f"{what}: TLS: the peer's certificate was not issued by this "
                              f"project's CA ({identity.ca}), or this node's was not ({d}).")
    if ("socket closed" in low or "connection reset" in low or "end of tcp stream" in low
            or "alert" in low or "handshake" in low or "ssl" in low or "tls" in low):
        return TransportError(f"{what}: the peer closed the connection during the TLS "
                              f"handshake ({d}): it probably refused this node's certificate "
                              f"{identity.cert} (not issued by the project's CA, or expired).")
    return TransportError(f"{what}: cannot reach the peer ({code.name}: {d}).")


class BlobClient:
    """Fetches blobs from peers' :class:`BlobServer`, verifying every blob's SHA-256.

    Keeps one gRPC channel per peer address (and ``server_name``), at most ``max_channels``
    of them (the least recently used is closed beyond that), so fetching a peer's blob every
    round reuses its TLS connection; :meth:`close` (or leaving the ``with`` block) closes
    them. Thread-safe: several threads may fetch at once.

    Args:
        identity: this node's key and certificate (issued with ``client=True``) and the
            project's CA certificate.
        max_bytes: the largest blob accepted (a fetch's ``max_bytes`` overrides it).
        timeout: seconds one fetch may take (a fetch's ``timeout`` overrides it).
        max_channels: channels kept open at once.
    """

    def __init__(self, identity: Identity, *, max_bytes: int = 1 << 30, timeout: float = 30.0,
                 max_channels: int = 32):
        key, cert, ca = identity.read()
        self.identity = identity
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_channels = max_channels
        self._creds = grpc.ssl_channel_credentials(ca, key, cert)
        self._channels: OrderedDict[tuple[str, str | None], grpc.Channel] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def _channel(self, address: str, server_name: str | None) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise TransportError("BlobClient: fetch after close(); make a new client.")
            key = (address, server_name)
            ch = self._channels.get(key)
            if ch is not None:
                self._channels.move_to_end(key)
                return ch
            options: list[tuple[str, Any]] = [
                ("grpc.max_receive_message_length", _RECEIVE_LIMIT),
                ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
                ("grpc.enable_retries", 0)]
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            ch = self._channels[key] = grpc.secure_channel(address, self._creds, options=options)
            old = None
            if len(self._channels) > self.max_channels:
                _, old = self._channels.popitem(last=False)
        if old is not None:
            old.close()
        return ch

    def fetch(self, address: str, sha256: str, *, max_bytes: int | None = None,
              timeout: float | None = None, server_name: str | None = None) -> bytes:
        """The blob with SHA-256 ``sha256`` from the peer at ``address`` (``host:port``).

        Returns the bytes only when their SHA-256 is ``sha256``; raises :class:`BlobError`
        when it differs (naming both hashes and the peer), when the peer has no such blob,
        or when it declares or sends more than ``max_bytes`` (the stream is cancelled);
        :class:`~shoal.errors.TransportError` for connection problems and refusals, with
        what to check. ``server_name``: the name to verify in the peer's certificate when it
        differs from the host in ``address``.
        """
        sha = sha256.lower()
        if not SHA256_PATTERN.match(sha):
            raise BlobError(f"fetching a blob from the peer at {address}: {sha256!r} is not a "
                            "SHA-256 (64 hex digits).", address=address, sha256=sha256)
        limit = self.max_bytes if max_bytes is None else max_bytes
        wait = self.timeout if timeout is None else timeout
        what = f"fetching blob {sha} from the peer at {address}"
        request = json.dumps({"sha256": sha}).encode()
        call = self._channel(address, server_name).unary_stream(METHOD)(request, timeout=wait)
        try:
            stream = iter(call)
            head = next(stream, None)
            if head is None:
                raise BlobError(f"{what}: the peer ended the stream without sending anything.",
                                address=address, sha256=sha)
            nbytes = self._head(head, what, address, sha)
            if nbytes > limit:
                raise BlobError(f"{what}: the blob has {nbytes} bytes, over the limit of "
                                f"{limit} bytes (max_bytes); refused unread.",
                                address=address, sha256=sha)
            buf = bytearray()
            for chunk in stream:
                if len(buf) + len(chunk) > nbytes:
                    raise BlobError(f"{what}: the peer sent more than the {nbytes} bytes it "
                                    f"declared (max_bytes is {limit}); refused.",
                                    address=address, sha256=sha)
                buf += chunk
        except grpc.RpcError as e:
            raise _fetch_problem(e, address, sha, self.identity, wait) from None
        finally:
            call.cancel()  # a no-op after the stream ended; stops it after a refusal
        if len(buf) != nbytes:
            raise BlobError(f"{what}: the stream ended after {len(buf)} of the {nbytes} bytes "
                            "the peer declared.", address=address, sha256=sha)
        data = bytes(buf)
        got = blob_hash(data)
        if got != sha:
            raise BlobError(f"{what}: the SHA-256 of the {len(data)} bytes received is {got}, "
                            f"which differs from the hash asked for ({sha}); the peer at "
                            f"{address} served other bytes than the ones recorded, and they "
                            "were discarded.", address=address, sha256=sha)
        return data

    @staticmethod
    def _head(head: bytes, what: str, address: str, sha: str) -> int:
        body: Any = None
        if len(head) <= _MAX_RESPONSE_HEAD:
            try:
                body = json.loads(head)
            except (ValueError, UnicodeDecodeError, RecursionError):
                body = None
        if not isinstance(body, dict):
            raise BlobError(f"{what}: the peer's first message is not the blob protocol's "
                            "JSON header; it does not speak the shoal blob protocol.",
                            address=address, sha256=sha)
        if body.get("protocol") != PROTOCOL:
            raise BlobError(f"{what}: the peer speaks blob protocol version "
                            f"{body.get('protocol')!r}, this node speaks {PROTOCOL}; run the "
                            "same shoal release on every peer.", address=address, sha256=sha)
        nbytes = body.get("nbytes")
        if type(nbytes) is not int or nbytes < 0 or body.get("sha256") != sha:
            raise BlobError(f"{what}: malformed response header {body!r}.",
                            address=address, sha256=sha)
        return nbytes

    def close(self) -> None:
        """Close every channel; later fetches raise :class:`TransportError`."""
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
        for ch in channels:
            ch.close()

    def __enter__(self) -> BlobClient:
        """The client itself."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close the client's channels."""
        self.close()


def fetch_blob(address: str, sha256: str, identity: Identity, *, timeout: float = 30,
               max_bytes: int, server_name: str | None = None) -> bytes:
    """Fetch one blob with a client of its own (see :meth:`BlobClient.fetch`; a peer that
    fetches every round keeps a :class:`BlobClient` instead, reusing its connections)."""
    with BlobClient(identity, max_bytes=max_bytes, timeout=timeout) as client:
        return client.fetch(address, sha256, server_name=server_name)
