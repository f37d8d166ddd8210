"""The dashboard behind the deployment's TLS: viewers with a viewer certificate the project's CA
issued are served; no certificate, another CA's certificate or a revoked one is refused in the
handshake (no HTTP response at all). A training client's certificate (no viewer role) gets
403: see test_viewer_role.py."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from shoal.config import load_config
from shoal.dashboard import DashboardState, DashboardTLS
from shoal.errors import ConfigError, TransportError
from shoal.net import CertificateAuthority, Identity

from ._sse import events, serving


@pytest.fixture
def pki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Identity | Path]:
    """A project CA with its coordinator certificate, two enrolled viewers (``--viewer``), and
    a viewer of another CA; no CA bundle from the environment (the CA is passed explicitly)."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    ca = CertificateAuthority.init(tmp_path / "ca")
    other = CertificateAuthority.init(tmp_path / "other")
    return {"dir": tmp_path / "ca", "ca": ca,  # type: ignore[dict-item]
            "viewer": ca.enroll("viewer", tmp_path / "viewers", viewer=True),
            "doomed": ca.enroll("doomed", tmp_path / "viewers", viewer=True),
            "stranger": other.enroll("viewer", tmp_path / "stranger", viewer=True)}


def _tls(d: Path) -> DashboardTLS:
    return DashboardTLS(d / "coordinator.crt", d / "coordinator.key", d / "ca.crt",
                        d / "crl.pem")


def _client_context(ca: Path, ident: Identity | None = None,
                    tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if ident is not None:
        ctx.load_cert_chain(str(ident.cert), str(ident.key))
    if tls12:  # the client's verdict on the handshake comes inside the handshake
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _refused_in_handshake(port: int, ctx: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                pass


def test_only_certificates_of_the_project_ca_are_served(pki) -> None:
    ca_crt = pki["dir"] / "ca.crt"
    state = DashboardState("served")
    state.start_run("federated", 5)
    with serving(state, tls=_tls(pki["dir"])) as server:
        assert server.url.startswith("https://127.0.0.1:")
        ok = _client_context(ca_crt, pki["viewer"])
        with httpx.Client(base_url=server.url, verify=ok, trust_env=False, timeout=10) as http:
            assert http.get("/").status_code == 200
            assert http.get("/state").json()["title"] == "served"
            with http.stream("GET", "/events") as stream:
                assert next(events(stream))[1]["run"]["rounds"] == 5
        for ident in (None, pki["stranger"]):
            with pytest.raises(httpx.TransportError):  # TLS 1.3: refused, never answered
                httpx.get(server.url + "state", verify=_client_context(ca_crt, ident),
                          trust_env=False, timeout=10)
            _refused_in_handshake(server.port, _client_context(ca_crt, ident, tls12=True))
        # A client that does not trust the project's CA does not trust the server either.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(server.url, verify=_client_context(pki["stranger"].ca, pki["viewer"]),
                      trust_env=False, timeout=10)


def test_a_viewer_revoked_while_the_dashboard_runs_is_refused_from_then_on(pki) -> None:
    ca_crt = pki["dir"] / "ca.crt"
    with serving(DashboardState(), tls=_tls(pki["dir"])) as server:
        doomed = _client_context(ca_crt, pki["doomed"])
        assert httpx.get(server.url + "state", verify=doomed, trust_env=False,
                         timeout=10).status_code == 200
        pki["ca"].revoke("doomed")  # rewrites crl.pem, which the dashboard watches
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "state", verify=_client_context(ca_crt, pki["doomed"]),
                      trust_env=False, timeout=10)
        _refused_in_handshake(server.port, _client_context(ca_crt, pki["doomed"], tls12=True))
        assert httpx.get(server.url + "state", verify=_client_context(ca_crt, pki["viewer"]),
                         trust_env=False, timeout=10).status_code == 200


def test_missing_or_forged_files_stop_the_start(pki, tmp_path) -> None:
    d = pki["dir"]
    config = load_config(None, [f'network.tls_dir="{tmp_path / "nowhere"}"'])
    with pytest.raises(ConfigError, match=r"dashboard TLS: the certificate file .*nowhere/"
                                          r"coordinator.crt' does not exist; .*`shoal ca init`"):
        with serving(DashboardState(), tls=DashboardTLS.for_deployment(config.network)):
            pass
    (d / "crl.pem").write_bytes((tmp_path / "other" / "crl.pem").read_bytes())
    with pytest.raises(TransportError, match="is not signed by this project's CA"):
        with serving(DashboardState(), tls=_tls(d)):
            pass
    (d / "crl.pem").unlink()
    with pytest.raises(TransportError, match="crl.pem' does not exist, so revoked certificates "
                                             "could not be refused"):
        with serving(DashboardState(), tls=_tls(d)):
            pass
