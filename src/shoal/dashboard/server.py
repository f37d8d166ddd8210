"""Serve the dashboard with uvicorn in a background thread, beside a run.

    server = DashboardServer(state, host="127.0.0.1", port=8050)
    url = server.start()          # listening when it returns; errors (port taken, TLS) raise
    ...                           # the run publishes into state
    server.stop()                 # ends the event streams, then the server

The socket is bound in :meth:`DashboardServer.start` (port 0: any free port; :attr:`port`
says which), and uvicorn's configuration, TLS included, is loaded there too, so a port in use,
a missing certificate or a wrong passphrase is an error of ``start``, not a dead thread. A
second thread samples the run's connected nodes every ``poll_nodes_s`` (see
:meth:`DashboardState.refresh_nodes`), so joins and leaves show between rounds.

Bounds beyond the app's own (:func:`~shoal.dashboard.app.create_app`): uvicorn's
``limit_concurrency`` (connections and tasks at once; more get 503), keep-alive and graceful
shutdown timeouts, no access log (a viewer cannot fill the log by reloading), and
``idle_timeout_s``: a connection with no request in progress that starts none for that long
(one that connects and sends nothing, or sends its request head byte by byte) is closed, so
idle sockets cannot hold every connection slot and shut the real viewers out. The listening
socket itself accepts at most ``2 * max_connections`` connections open at once, TLS handshakes
in progress included (asyncio gives a handshake 60 s, and uvicorn counts a connection only
once it is made): one more is closed at once, so nobody, certificate or not, can take the
process's file descriptors, which under ``shoal serve`` are the coordinator's.

Under TLS, the client certificate of each connection (verified in the handshake) is handed to
the app in the ASGI TLS extension (``scope["extensions"]["tls"]["client_cert_chain"]``: the
leaf certificate, PEM), which uvicorn does not fill by itself; the app admits only a dashboard
viewer's certificate (``create_app(viewers_only=True)``: 403 otherwise).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
import threading
import time
import weakref
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ConfigError
from .app import create_app
from .state import DashboardState
from .tls import DashboardTLS

__all__ = ["DashboardServer", "is_loopback"]

log = logging.getLogger(__name__)


class _DroppedViewerFilter(logging.Filter):
    """uvicorn logs an error when an app ends a response early; the app does that only when
    it drops a stalled viewer, which it has logged itself (a warning that says why)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "ASGI callable returned without completing response."


_DROPPED_VIEWER_FILTER = _DroppedViewerFilter()


class _CappedListener(socket.socket):
    """A listening socket that keeps at most ``cap`` accepted connections open at once;
    beyond that a new one is closed as soon as it is accepted (asyncio's accept loop takes
    the ``ConnectionAbortedError`` as "nothing more to accept now")."""

    def __init__(self, family: int, cap: int):
        super().__init__(family, socket.SOCK_STREAM)
        self.cap = cap
        self._conns: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._warned = False

    def accept(self) -> tuple[socket.socket, Any]:
        fd, addr = self._accept()  # type: ignore[attr-defined]
        conn = socket.socket(self.family, self.type, self.proto, fileno=fd)
        if sum(1 for c in self._conns if c.fileno() != -1) >= self.cap:
            conn.close()
            if not self._warned:
                self._warned = True
                log.warning("dashboard: %d connections are open (the most it keeps); closing "
                            "new ones until some end (further refusals are not logged)",
                            self.cap)
            raise ConnectionAbortedError("dashboard: too many open connections")
        self._conns.add(conn)
        return conn, addr


def _with_client_certificate(app: ASGIApp, pem: str | None) -> ASGIApp:
    """``app`` with the ASGI TLS extension in every scope: ``client_cert_chain`` holds the
    connection's client certificate ``pem`` (empty when there is none)."""
    tls = {"server_cert": None, "client_cert_chain": [pem] if pem else [],
           "client_cert_name": None, "client_cert_error": None, "tls_version": None,
           "cipher_suite": None}

    async def with_tls(scope: Scope, receive: Receive, send: Send) -> None:
        scope["extensions"] = {**(scope.get("extensions") or {}), "tls": dict(tls)}
        await app(scope, receive, send)

    return with_tls


class _IdleClosingH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has no request in progress and
    has started none for ``idle_timeout_s`` (checked every ``idle_timeout_s``: such a
    connection lives at most twice that). uvicorn itself times out only the wait *between*
    requests: a connection that never completes a first request head would hold one of the
    ``limit_concurrency`` slots for ever."""

    idle_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:  # the certificate the handshake verified, for the app's role check
            der = tls.getpeercert(binary_form=True)
            self.app = _with_client_certificate(
                self.app, ssl.DER_cert_to_PEM_cert(der) if der else None)
        self._seen: object = None
        self._idle_check = self.loop.call_later(self.idle_timeout_s, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.transport.is_closing():
            return
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        if not busy and cycle is self._seen:  # no request for a whole period
            # abort, not close: nothing is in flight, and a TLS close would wait up to 30 s
            # for the peer's close_notify with the slot still taken
            self.transport.abort()
            return
        self._seen = cycle
        self._idle_check = self.loop.call_later(self.idle_timeout_s, self._close_if_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        check = getattr(self, "_idle_check", None)
        if check is not None:
            check.cancel()
        super().connection_lost(exc)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardServer:
    """The dashboard over ``state`` on ``host``:``port``; see the module docstring.

    ``tls``: serve HTTPS to viewers with a viewer certificate from the project's CA only
    (``shoal ca enroll NAME --viewer``; any other certificate of the CA, a training client's
    included, gets 403; ``None``: plain HTTP, for this machine's own browser).
    ``max_streams``, ``poll_s``, ``heartbeat_s``, ``send_timeout_s`` and ``max_stream_s`` are
    :func:`~shoal.dashboard.app.create_app`'s; ``max_connections`` bounds the connections
    (default ``max_streams + 32``); ``idle_timeout_s``: a connection that starts no request for
    that long is closed (see the module docstring).
    """

    def __init__(self, state: DashboardState, *, host: str = "127.0.0.1", port: int = 0,
                 tls: DashboardTLS | None = None, max_streams: int = 8,
                 max_connections: int | None = None, poll_s: float = 0.1,
                 heartbeat_s: float = 15.0, send_timeout_s: float = 30.0,
                 poll_nodes_s: float = 1.0, idle_timeout_s: float = 10.0,
                 max_stream_s: float = 300.0):
        if not 0 <= port <= 65535:
            raise ConfigError(f"dashboard: port must be 0..65535 (got {port}).")
        if idle_timeout_s <= 0:
            raise ConfigError(f"dashboard: idle_timeout_s must be > 0 (got {idle_timeout_s}).")
        self._protocol = type("_DashboardH11", (_IdleClosingH11,),
                              {"idle_timeout_s": float(idle_timeout_s)})
        self.state = state
        self.host = host
        self.tls = tls
        self.max_streams = max_streams
        self.max_connections = max_connections or max_streams + 32
        self.poll_nodes_s = poll_nodes_s
        self._requested_port = port
        self._closing = threading.Event()
        # Plain HTTP serves this machine: only its own names are answered (a site whose name
        # is rebound to 127.0.0.1 gets 400). Under TLS the certificate's names do that.
        hosts = None if tls else {"127.0.0.1", "localhost", "::1", host}
        self.app = create_app(state, max_streams=max_streams, poll_s=poll_s,
                              heartbeat_s=heartbeat_s, send_timeout_s=send_timeout_s,
                              allowed_hosts=hosts, closing=self._closing,
                              max_stream_s=max_stream_s, viewers_only=tls is not None)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._poller: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """``http(s)://HOST:PORT/`` (after :meth:`start`)."""
        if self.port is None:
            raise ConfigError("dashboard: the server has not started; call start() first.")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> str:
        """Bind, load the configuration, start serving; returns :attr:`url` once uvicorn
        listens. Raises :class:`ConfigError` when the port cannot be bound or TLS cannot be
        set up."""
        if self._thread is not None:
            raise ConfigError("dashboard: the server is already started.")
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, log_level="warning",
            lifespan="off", limit_concurrency=self.max_connections, timeout_keep_alive=5,
            http=self._protocol, loop="asyncio",  # the listener cap needs asyncio's accept loop
            timeout_graceful_shutdown=2, server_header=False,
            ws="none",  # no WebSocket upgrades: every request goes through the HTTP path
            **(self.tls.uvicorn_options() if self.tls else {}))
        config.load()  # TLS files, key passphrase and CRL: errors here, in the caller's thread
        logging.getLogger("uvicorn.error").addFilter(_DROPPED_VIEWER_FILTER)  # once: same object
        sock = self._bind()
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, args=(sock,),
                                        name="shoal-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"dashboard: the server did not start on "
                                  f"{self.host}:{self.port} within {timeout:g} s (see the log).")
            time.sleep(0.01)
        self._poller = threading.Thread(target=self._poll_nodes, name="shoal-dashboard-nodes",
                                        daemon=True)
        self._poller.start()
        log.info("dashboard on %s", self.url)
        return self.url

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = _CappedListener(family, cap=2 * self.max_connections)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            hint = ("another program listens there; pass another --dashboard-port (0 picks a "
                    "free one)" if e.errno == errno.EADDRINUSE
                    else "check --dashboard-host")
            raise ConfigError(f"dashboard: cannot listen on {self.host}:{self._requested_port} "
                              f"({e.strerror or e}); {hint}.") from None
        sock.set_inheritable(True)
        return sock

    def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=[sock])
        except BaseException:  # a dead dashboard must not take the run with it
            log.exception("dashboard: the server stopped with an error")

    def _poll_nodes(self) -> None:
        while not self._closing.wait(self.poll_nodes_s):
            self.state.refresh_nodes()

    def stop(self, timeout: float = 5.0) -> None:
        """End the event streams (each gets ``event: end``), stop uvicorn and the poller, and
        close the socket. Safe to call twice."""
        self._closing.set()
        if self._server is not None:
            if self.app.state.events.open:  # let the streams send their end
                time.sleep(min(0.3, 3 * self.app.state.events.poll_s))
            self._server.should_exit = True
        for thread in (self._thread, self._poller):
            if thread is not None:
                thread.join(timeout)
                if thread.is_alive():
                    log.warning("dashboard: %s did not stop within %g s", thread.name, timeout)
        if self._socket is not None:
            self._socket.close()
        self._thread = self._poller = self._server = self._socket = None

    def __enter__(self) -> DashboardServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
