"""Fixtures for the deployment tests: a CA with enrolled nodes, and clean TLS environment."""

from __future__ import annotations

import pytest
import torch

from shoal.net import CertificateAuthority


@pytest.fixture(autouse=True)
def _no_ca_bundles(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine sets CA bundles for HTTP clients; the tests pass their own CA explicitly.
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
                "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ca_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ca")
    ca = CertificateAuthority.init(root / "ca")
    for i in range(4):
        ca.enroll(f"client-{i}", root / "nodes")
    return root
