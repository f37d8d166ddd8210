"""Fixtures for the ledger tests: one 3-member etcd cluster with mutual TLS and RBAC for the
whole session (skipped where etcd is not installed), and a clean TLS environment."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal.ledger.cluster import ETCD_BINARY, EtcdCluster
from shoal.ledger.enroll import Registrar
from shoal.ledger.etcd import EtcdStore
from shoal.net.ca import CertificateAuthority

_CA_VARS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")


@pytest.fixture(autouse=True)
def _no_ca_bundles(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine sets CA bundles for HTTP clients; the tests pass their own CA explicitly.
    for var in _CA_VARS:
        monkeypatch.delenv(var, raising=False)


@dataclass
class Etcd:
    """The session's cluster, its CA, an administrator's store and the registrar."""

    cluster: EtcdCluster
    ca: CertificateAuthority
    admin: EtcdStore
    registrar: Registrar
    root: Path


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    if not (shutil.which("etcd") or Path(ETCD_BINARY).is_file()):
        pytest.skip(f"etcd is not installed ({ETCD_BINARY}); `apt-get install etcd-server` "
                    "(scripts/setup.sh does it when run as root)")
    root = tmp_path_factory.mktemp("etcd")
    with pytest.MonkeyPatch.context() as mp:
        for var in _CA_VARS:
            mp.delenv(var, raising=False)
        ca = CertificateAuthority.init(root / "ca")
        with EtcdCluster(root / "cluster", ca) as cluster:
            admin = cluster.store()
            try:
                yield Etcd(cluster, ca, admin, Registrar(admin, ca), root)
            finally:
                admin.close()
