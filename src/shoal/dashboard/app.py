"""The dashboard's web app (Starlette): read-only, bounded.

* ``GET /`` — the page (:data:`~shoal.dashboard.page.PAGE`, self-contained);
* ``GET /events`` — server-sent events: an ``event: state`` with the current snapshot at
  once, then one each time the state's version changes (a viewer that reads slowly skips the
  versions published meanwhile: it always gets the newest snapshot, never a backlog), and a
  comment every ``heartbeat_s`` so dead connections are noticed; a viewer that takes
  nothing for ``send_timeout_s`` is dropped; a stream ends (without ``event: end``, so the
  browser reconnects by itself) after ``max_stream_s``, so every viewer passes the TLS
  handshake, and the revocation list in force, again: a viewer revoked while watching is
  shut out within ``max_stream_s``;
* ``GET /state`` — the current snapshot as JSON.

With ``viewers_only`` (the dashboard under ``shoal serve``, behind mutual TLS), every request
whose client certificate is not a dashboard viewer's (``shoal ca enroll NAME --viewer``: its
Extended Key Usage lists :data:`~shoal.net.ca.VIEWER_OID`) is refused with 403 and a message
saying how to get one, before anything else is looked at: a training client's certificate,
issued by the same CA, does not show it the other clients. The certificate comes from the
ASGI TLS extension (``scope["extensions"]["tls"]["client_cert_chain"]``, which
:class:`~shoal.dashboard.server.DashboardServer` fills); a request without one is refused too.

Every route answers GET and HEAD only (anything else: 405); nothing a viewer sends changes the
state. With ``allowed_hosts`` (plain HTTP on loopback), a request naming another host is
refused (DNS rebinding). At most ``max_streams`` event streams are open at once; one more is refused with 503
and a ``Retry-After``. Every response carries a Content-Security-Policy that lets only the
page's own script and style run, and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ConfigError, TransportError
from ..net.ca import is_viewer, peer_identity
from ..net.limits import LogLimiter
from .page import CONTENT_SECURITY_POLICY, PAGE
from .state import DashboardState

__all__ = ["NOT_A_VIEWER", "SECURITY_HEADERS", "create_app", "viewer_refusal"]

log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
"""Headers on every response of the dashboard."""

NOT_A_VIEWER = (
    "403 Forbidden: {problem}. The dashboard shows every client of the federation, so it admits "
    "viewer certificates only, and a training client's certificate is not one. Ask the "
    "project's CA to issue a viewer certificate with `shoal ca enroll NAME --viewer` and open "
    "the dashboard with that one.\n")
"""The body of the 403 answering a certificate without the viewer role (``{problem}``: e.g.
"the certificate 'hospital-a' is not a dashboard viewer's certificate")."""


_refusals = LogLimiter(3)
"""Refused certificates are logged at most 3 times a minute per reason (a client that reloads
cannot fill the log), then counted (:class:`~shoal.net.limits.LogLimiter`)."""


class _SlowViewer(Exception):
    """A viewer did not take an event within ``send_timeout_s``."""


class _Events:
    """``/events``: a bounded number of server-sent-event streams of the state's snapshots."""

    def __init__(self, state: DashboardState, max_streams: int, poll_s: float,
                 heartbeat_s: float, send_timeout_s: float, closing: threading.Event,
                 max_stream_s: float = 300.0):
        self.state = state
        self.max_streams = max_streams
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.send_timeout_s = send_timeout_s
        self.closing = closing
        self.max_stream_s = max_stream_s
        self.open = 0  # only touched on the server's event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
        if scope["method"] == "HEAD":
            await Response(media_type="text/event-stream", headers=headers)(scope, receive, send)
            return
        if self.open >= self.max_streams:
            log.warning("dashboard: refused an event stream from %s: %d streams are open "
                        "(the limit)", _client(scope), self.open)
            await PlainTextResponse(
                f"too many viewers: {self.open} event streams are open, the most this "
                "dashboard serves; close one or try again later.\n", status_code=503,
                headers={**SECURITY_HEADERS, "Retry-After": "10"})(scope, receive, send)
            return
        async def bounded_send(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), self.send_timeout_s)
            except TimeoutError:
                raise _SlowViewer from None

        self.open += 1
        try:
            await StreamingResponse(self._stream(), media_type="text/event-stream",
                                    headers=headers)(scope, receive, bounded_send)
        except _SlowViewer:  # its slot goes to someone who reads
            log.warning("dashboard: dropped the event stream of %s: it read nothing for %g s",
                        _client(scope), self.send_timeout_s)
        finally:
            self.open -= 1

    async def _stream(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        sent = -1
        quiet_since = opened = loop.time()
        yield b"retry: 2000\n\n"
        while True:
            if loop.time() - opened >= self.max_stream_s:
                return  # no "end": the browser reconnects (a new handshake, the newest CRL)
            closing = self.closing.is_set()  # read first: the last snapshot still goes out
            snap = self.state.snapshot()  # the newest, whatever was published meanwhile
            if snap.version != sent:
                sent = snap.version
                quiet_since = loop.time()
                yield f"event: state\nid: {snap.version}\ndata: {snap.json}\n\n".encode()
            elif loop.time() - quiet_since >= self.heartbeat_s:
                quiet_since = loop.time()
                yield b": keep-alive\n\n"
            if closing:
                break
            await asyncio.sleep(self.poll_s)
        yield b"event: end\ndata: {}\n\n"


def viewer_refusal(scope: Scope) -> str | None:
    """Why the request in ``scope`` may not see the dashboard (the body of a 403), or ``None``
    when its client certificate (from the ASGI TLS extension) is a dashboard viewer's."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return NOT_A_VIEWER.format(problem="this connection presented no client certificate")
    pem = chain[0].encode("ascii") if isinstance(chain[0], str) else bytes(chain[0])
    try:
        if is_viewer(pem):
            return None
        name = peer_identity(pem)[0]
    except TransportError:
        return NOT_A_VIEWER.format(problem="the certificate this connection presented is not a "
                                           "dashboard viewer's certificate")
    return NOT_A_VIEWER.format(problem=f"the certificate {name[:64]!r} is not a dashboard "
                                       "viewer's certificate")


def _host_name(header: str) -> str:
    """The host of a Host header, without its port (``[::1]:8050`` → ``::1``); a bracketed
    host followed by anything but ``:PORT`` (``[::1]evil``) is returned whole (no match)."""
    if header.startswith("["):
        host, _, rest = header[1:].partition("]")
        return host if rest == "" or (rest[:1] == ":" and rest[1:].isdigit()) else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Guard:
    """With ``viewers_only``, refuse a request whose client certificate is not a dashboard
    viewer's with 403 (:func:`viewer_refusal`), first of all; refuse every method but GET and
    HEAD with 405, on every path (known or not); with ``allowed_hosts``, refuse a request whose
    Host header names another host with 400 (a page of another site, its name rebound to
    127.0.0.1, cannot read the dashboard)."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] | None = None,
                 viewers_only: bool = False):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.viewers_only = viewers_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.viewers_only:
            refusal = viewer_refusal(scope)
            if refusal is not None:
                reason = refusal.split(". ", 1)[0].removeprefix("403 Forbidden: ")
                _refusals.warning(reason, "dashboard: refused %s with 403: %s", _client(scope),
                                  reason)
                await PlainTextResponse(refusal, status_code=403,
                                        headers=SECURITY_HEADERS)(scope, receive, send)
                return
        if scope["type"] == "http" and self.allowed_hosts is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if _host_name(host).lower() not in self.allowed_hosts:
                await PlainTextResponse(
                    f"the dashboard answers to {', '.join(sorted(self.allowed_hosts))} only "
                    f"(this request named {host[:64]!r}); open it as http://127.0.0.1:PORT/.\n",
                    status_code=400, headers=SECURITY_HEADERS)(scope, receive, send)
                return
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            await PlainTextResponse(
                f"the dashboard is read-only: {scope['method'][:16]} is not allowed; use GET.\n",
                status_code=405, headers={**SECURITY_HEADERS, "Allow": "GET, HEAD"},
            )(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "an unknown client"


def create_app(state: DashboardState, *, max_streams: int = 8, poll_s: float = 0.1,
               heartbeat_s: float = 15.0, send_timeout_s: float = 30.0,
               allowed_hosts: Iterable[str] | None = None,
               closing: threading.Event | None = None,
               max_stream_s: float = 300.0, viewers_only: bool = False) -> Starlette:
    """The dashboard app over ``state``; see the module docstring.

    ``max_streams``: event streams open at once (more get 503); ``poll_s``: how often a stream
    looks for a new version; ``heartbeat_s``: the comment sent on a quiet stream;
    ``send_timeout_s``: a viewer that takes no data for this long is dropped (a stalled
    viewer cannot hold a stream slot for ever); ``allowed_hosts``: the host names a request's
    Host header may give (``None``: any); ``max_stream_s``: the longest an event stream
    lasts before the browser must reconnect; ``viewers_only``: serve only requests whose
    client certificate is a dashboard viewer's (403 otherwise; see the module docstring);
    ``closing``:
    set it to end every stream (with an ``event: end``), as
    :class:`~shoal.dashboard.server.DashboardServer` does when it stops."""
    if max_streams < 1:
        raise ConfigError(f"dashboard: max_streams must be >= 1 (got {max_streams}).")
    if min(poll_s, heartbeat_s, send_timeout_s, max_stream_s) <= 0:
        raise ConfigError(f"dashboard: poll_s, heartbeat_s, send_timeout_s and max_stream_s "
                          f"must be > 0 (got {poll_s}, {heartbeat_s}, {send_timeout_s}, "
                          f"{max_stream_s}).")
    events = _Events(state, max_streams, poll_s, heartbeat_s, send_timeout_s,
                     closing or threading.Event(), max_stream_s)

    async def page(request: Request) -> Response:
        return Response(PAGE, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def snapshot(request: Request) -> Response:
        return Response(state.snapshot().json, media_type="application/json",
                        headers=SECURITY_HEADERS)

    async def no_icon(request: Request) -> Response:  # browsers ask; nothing to fetch
        return Response(status_code=204, headers=SECURITY_HEADERS)

    hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
    guard = Middleware(_Guard, allowed_hosts=hosts, viewers_only=viewers_only)
    app = Starlette(middleware=[guard], routes=[
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/state", snapshot, methods=["GET", "HEAD"]),
        Route("/events", events, methods=["GET", "HEAD"]),
        Route("/favicon.ico", no_icon, methods=["GET", "HEAD"]),
    ])
    app.state.events = events  # for tests and the server: the open stream count
    return app
