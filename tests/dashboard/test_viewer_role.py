"""The viewer role of the dashboard under `shoal serve` (mutual TLS).

Attack: a training client of the federation opens the dashboard with its own certificate (issued
by the project's CA, not revoked) to learn about the other clients: which nodes are connected,
their dropouts, the metrics. Before the fix any certificate of the CA was served. Now only a
viewer certificate (`shoal ca enroll NAME --viewer`) is; any other gets 403, with a message that
says what is wrong and how to get a viewer certificate, and nothing of the run.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from shoal.dashboard import DashboardState, DashboardTLS, create_app
from shoal.net import CertificateAuthority, Identity

from ._sse import events, serving

REFUSED = (
    "403 Forbidden: the certificate 'hospital-a' is not a dashboard viewer's certificate. The "
    "dashboard shows every client of the federation, so it admits viewer certificates only, and "
    "a training client's certificate is not one. Ask the project's CA to issue a viewer "
    "certificate with `shoal ca enroll NAME --viewer` and open the dashboard with that one.\n")


@pytest.fixture
def pki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A project CA, a training client's certificate (normal enrollment) and a viewer's; no CA
    bundle from the environment (the CA is passed explicitly)."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    ca = CertificateAuthority.init(tmp_path / "ca")
    return {"dir": tmp_path / "ca", "ca": ca,
            "client": ca.enroll("hospital-a", tmp_path / "nodes"),
            "viewer": ca.enroll("alice", tmp_path / "viewers", viewer=True)}


def _tls(d: Path) -> DashboardTLS:
    return DashboardTLS(d / "coordinator.crt", d / "coordinator.key", d / "ca.crt",
                        d / "crl.pem")


def _context(ca: Path, ident: Identity) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(ident.cert), str(ident.key))
    return ctx


def _federation() -> DashboardState:
    """A run whose page names the clients: hospital-b connected, dropped out of round 1."""
    state = DashboardState("federation")
    state.start_run("federated", 5)
    state.set_nodes(["hospital-a", "hospital-b"])
    state.round_finished(1, {"central/accuracy": 0.75}, dropped={"hospital-b": "timed out"})
    return state


def test_a_training_clients_certificate_is_refused_with_403(pki) -> None:
    ctx = _context(pki["dir"] / "ca.crt", pki["client"])
    with serving(_federation(), tls=_tls(pki["dir"])) as server:
        with httpx.Client(base_url=server.url, verify=ctx, trust_env=False, timeout=10) as http:
            for path in ("/", "/state", "/events", "/favicon.ico", "/nowhere"):
                r = http.get(path)
                assert r.status_code == 403, path
                assert r.text == REFUSED, path
                assert "hospital-b" not in r.text and "accuracy" not in r.text
                assert r.headers["cache-control"] == "no-store"
                assert r.headers["content-type"].startswith("text/plain")
            assert http.head("/state").status_code == 403
            # The refusal comes first: no method or path tells it anything else.
            r = http.post("/state", content=b"x")
            assert r.status_code == 403 and r.text == REFUSED
        # Over a raw TLS socket with HTTP/1.0 too.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"GET /state HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
        assert reply.startswith(b"HTTP/1.1 403") and b"hospital-b" not in reply


def test_a_viewer_certificate_is_admitted(pki) -> None:
    ctx = _context(pki["dir"] / "ca.crt", pki["viewer"])
    with serving(_federation(), tls=_tls(pki["dir"])) as server:
        with httpx.Client(base_url=server.url, verify=ctx, trust_env=False, timeout=10) as http:
            assert http.get("/").status_code == 200
            snap = http.get("/state").json()
            assert [n["id"] for n in snap["nodes"]["list"]] == ["hospital-a", "hospital-b"]
            with http.stream("GET", "/events") as stream:
                name, data = next(events(stream))
            assert name == "state" and data["run"]["rounds"] == 5
            # Several requests on one kept-alive connection: each one is checked and served.
            assert http.get("/state").status_code == 200


def test_a_revoked_viewer_is_refused(pki) -> None:
    ca_crt = pki["dir"] / "ca.crt"
    with serving(_federation(), tls=_tls(pki["dir"])) as server:
        assert httpx.get(server.url + "state", verify=_context(ca_crt, pki["viewer"]),
                         trust_env=False, timeout=10).status_code == 200
        pki["ca"].revoke("alice")  # rewrites crl.pem, which the dashboard watches
        with pytest.raises(httpx.TransportError):  # refused in the handshake, as before
            httpx.get(server.url + "state", verify=_context(ca_crt, pki["viewer"]),
                      trust_env=False, timeout=10)
        # The client's certificate is still answered with the 403, not with the run.
        r = httpx.get(server.url + "state", verify=_context(ca_crt, pki["client"]),
                      trust_env=False, timeout=10)
        assert r.status_code == 403 and r.text == REFUSED


def _get(app, path: str) -> httpx.Response:
    """``GET path`` of the ASGI ``app`` in this process (no server, no TLS)."""
    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://127.0.0.1") as http:
            return await http.get(path)
    return asyncio.run(get())


def test_the_app_refuses_a_request_without_a_certificate_when_viewers_only() -> None:
    """A second line of defence: with no client certificate in the scope (no TLS extension) the
    app refuses; without viewers_only (`shoal run --dashboard`, plain HTTP) it serves."""
    state = _federation()
    r = _get(create_app(state, viewers_only=True), "/state")
    assert r.status_code == 403
    assert r.text.startswith("403 Forbidden: this connection presented no client "
                             "certificate. ")
    assert "`shoal ca enroll NAME --viewer`" in r.text and "hospital" not in r.text
    assert _get(create_app(state), "/state").json()["title"] == "federation"
