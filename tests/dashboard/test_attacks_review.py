"""A hostile review of the live dashboard: each test is an attack by an outsider (a process on
this machine for plain HTTP, a remote viewer under TLS) against a real uvicorn server on
127.0.0.1, with real TLS and, where the page matters, a real browser."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from shoal.dashboard import DashboardServer, DashboardState, DashboardTLS
from shoal.errors import ConfigError
from shoal.net import CertificateAuthority

from ._sse import events, serving

HOSTILE = '<img src=x onerror="window.__pwned=1">'


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def test_idle_and_slow_connections_cannot_shut_the_viewers_out() -> None:
    """Attack: open as many connections as the server admits and send nothing (or a request
    head one byte at a time). Before the fix uvicorn kept them for ever and every real viewer
    got 503 "Exceeded concurrency limit"; now they are closed and the page is served."""
    state = DashboardState("idle")
    state.start_run("federated", 3)
    with serving(state, max_streams=1, max_connections=4, idle_timeout_s=0.5) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"GET /state HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
        try:
            for s in [*idle, slow]:
                assert _closed_by_server(s, 3.0)
            r = httpx.get(server.url + "state", trust_env=False, timeout=5)
            assert r.status_code == 200 and r.json()["title"] == "idle"
        finally:
            for s in [*idle, slow]:
                s.close()


def test_a_keep_alive_viewer_and_an_event_stream_are_not_cut_as_idle() -> None:
    """The idle limit must not cut a viewer that is being served: an event stream stays open
    (and keeps receiving) well past ``idle_timeout_s``."""
    state = DashboardState("live")
    state.start_run("federated", 50)
    with serving(state, idle_timeout_s=0.3, heartbeat_s=0.2) as server:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=5) as http:
            with http.stream("GET", "/events") as stream:
                seen = events(stream)
                assert next(seen)[0] == "state"
                for r in range(1, 5):
                    time.sleep(0.35)
                    state.round_finished(r, {"central/accuracy": r / 10})
                    name, data = next(seen)
                    assert data["run"]["done"] == r
            assert http.get("/state").status_code == 200


def test_a_bad_idle_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        DashboardServer(DashboardState(), idle_timeout_s=0)


def test_an_oversized_request_head_is_refused_and_the_server_goes_on() -> None:
    """Attack: a 1 MiB header. The server must not buffer it (h11 stops at 16 KiB)."""
    state = DashboardState("big")
    with serving(state) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            try:
                s.sendall(b"a" * (1 << 20))
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed on us: as good as a 400
            else:
                s.settimeout(5)
                try:
                    head = s.recv(64)
                except ConnectionResetError:
                    head = b""
                assert head == b"" or head.startswith(b"HTTP/1.1 4")
        assert httpx.get(server.url + "state", trust_env=False, timeout=5).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "localhost.",
                                  "", "[::1]evil"])
def test_dns_rebinding_hosts_are_refused(host: str) -> None:
    """Attack: a page of another site whose name resolves to 127.0.0.1 reads the run."""
    state = DashboardState("rebind")
    with serving(state) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(f"GET /state HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                      .encode())
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
        assert b"rebind" not in reply


@pytest.fixture
def pki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    ca = CertificateAuthority.init(tmp_path / "ca")
    return {"dir": tmp_path / "ca", "ca": ca, "other_crl": tmp_path / "other" / "crl.pem",
            "viewer": ca.enroll("viewer", tmp_path / "viewers", viewer=True),
            "stranger": CertificateAuthority.init(tmp_path / "other").enroll(
                "viewer", tmp_path / "stranger", viewer=True)}


def _tls(d: Path) -> DashboardTLS:
    return DashboardTLS(d / "coordinator.crt", d / "coordinator.key", d / "ca.crt",
                        d / "crl.pem")


def _context(ca: Path, ident=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if ident is not None:
        ctx.load_cert_chain(str(ident.cert), str(ident.key))
    return ctx


def test_an_enrolled_viewer_cannot_hold_every_slot_with_idle_tls_connections(pki) -> None:
    """Attack (a viewer with a good certificate): open TLS connections, finish the handshake,
    send nothing. They are closed; another viewer is still served."""
    state = DashboardState("tls-idle")
    ctx = _context(pki["dir"] / "ca.crt", pki["viewer"])
    with serving(state, tls=_tls(pki["dir"]), max_streams=1, max_connections=3,
                 idle_timeout_s=0.5) as server:
        held = []
        try:
            for _ in range(3):
                raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                held.append(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
            for s in held:
                assert _closed_by_server(s, 3.0)
            with httpx.Client(base_url=server.url, verify=ctx, trust_env=False,
                              timeout=5) as http:
                assert http.get("/state").json()["title"] == "tls-idle"
        finally:
            for s in held:
                s.close()


def test_a_forged_revocation_list_does_not_unrevoke_a_viewer(pki) -> None:
    """Attack: the viewer revoked, someone swaps ``crl.pem`` for an empty list signed by
    another CA (or garbage). The last good list stays in force: the viewer stays out."""
    d = pki["dir"]
    state = DashboardState("crl")
    ctx = _context(d / "ca.crt", pki["viewer"])
    pki["ca"].revoke("viewer")
    with serving(state, tls=_tls(d)) as server:
        for forged in (pki["other_crl"].read_bytes(),
                       b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n"):
            (d / "crl.pem").write_bytes(forged)
            with pytest.raises(httpx.TransportError):
                httpx.get(server.url + "state", verify=ctx, trust_env=False, timeout=5)


def test_hostile_names_from_the_run_stay_text_in_the_browser(browser) -> None:
    """Attack: a node id, a metric name, a dropout reason, a failure and a run label that are
    HTML with a script in an event handler. The page shows them as text; nothing runs."""
    state = DashboardState(HOSTILE)
    state.start_run(HOSTILE, 3, label=HOSTILE, info={HOSTILE: HOSTILE})
    state.set_nodes([HOSTILE, "</script><script>window.__pwned=2</script>"])
    state.round_finished(1, {"central/accuracy": 0.5, HOSTILE: 1.0},
                         dropped={HOSTILE: HOSTILE}, failed=HOSTILE)
    with serving(state) as server:
        browser.get(server.url)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            if browser.execute_script(
                    "return document.querySelectorAll('#nodes tbody tr').length") == 2:
                break
            time.sleep(0.1)
        assert browser.execute_script("return window.__pwned === undefined")
        assert browser.execute_script("return document.querySelectorAll('img').length") == 0
        body = browser.execute_script("return document.body.textContent")
        assert HOSTILE in body and "window.__pwned=2" in body


def test_a_viewer_revoked_while_watching_loses_the_stream(pki) -> None:
    """Attack: a viewer opens the event stream, is then revoked (``shoal ca revoke``) and keeps
    the stream open. Before the fix the stream (kept alive by heartbeats) went on for ever:
    the revocation list is checked in the handshake only. Now a stream lasts at most
    ``max_stream_s``; the browser's reconnection is a new handshake, which is refused."""
    d = pki["dir"]
    state = DashboardState("revoked")
    state.start_run("federated", 100)
    ctx = _context(d / "ca.crt", pki["viewer"])
    with serving(state, tls=_tls(d), max_stream_s=1.0, heartbeat_s=0.2) as server:
        with httpx.Client(base_url=server.url, verify=ctx, trust_env=False,
                          timeout=5) as http:
            started = time.monotonic()
            with http.stream("GET", "/events") as stream:
                pki["ca"].revoke("viewer")
                got = [name for name, _ in events(stream)]  # until the server ends it
            assert time.monotonic() - started < 4
            assert got and "end" not in got  # no "end": a browser would reconnect
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "state", verify=ctx, trust_env=False, timeout=5)


def test_a_bad_stream_lifetime_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_stream_s"):
        DashboardServer(DashboardState(), max_stream_s=0)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_a_flood_of_unauthenticated_tls_connections_cannot_take_the_file_descriptors(
        pki) -> None:
    """Attack (no certificate at all): open hundreds of TCP connections to the TLS dashboard
    and never start the handshake. asyncio waits 60 s for each handshake, and uvicorn counts
    a connection only once it is made, so before the fix every one held a descriptor of the
    process (under `shoal serve`, the coordinator's: its nodes could no longer connect). Now
    the listener keeps at most 2 * max_connections open; once the flood ends, a viewer with
    a good certificate is served again."""
    import os

    state = DashboardState("flood")
    ctx = _context(pki["dir"] / "ca.crt", pki["viewer"])
    with serving(state, tls=_tls(pki["dir"]), max_streams=1, max_connections=4) as server:
        before = len(os.listdir("/proc/self/fd"))
        flood = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
        try:
            time.sleep(1.0)
            held = len(os.listdir("/proc/self/fd")) - before - len(flood)
            assert held <= 2 * 4, held
        finally:
            for s in flood:
                s.close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the closed ones as their handshakes fail
            try:
                with httpx.Client(base_url=server.url, verify=ctx, trust_env=False,
                                  timeout=5) as http:
                    assert http.get("/state").json()["title"] == "flood"
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
