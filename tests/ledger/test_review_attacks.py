"""Attacks from an adversarial review of the swarm ledger and the blob service, each written
as the attack: what a hostile device or certificate holder does, and what must hold anyway."""

from __future__ import annotations

import uuid

import pytest

from shoal.errors import ConfigError, TransportError
from shoal.ledger.blob_service import BlobServer, fetch_blob
from shoal.ledger.blobs import BlobStore
from shoal.ledger.entry import Entry
from shoal.ledger.keys import registry_key, registry_value
from shoal.ledger.ledger import Ledger, LedgerError
from shoal.ledger.store import MemoryStore
from shoal.net.ca import CertificateAuthority

MiB = 1024 * 1024


def _uid(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def _no_ca_bundles(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
                "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        monkeypatch.delenv(var, raising=False)


# -- F6: a dashboard viewer's certificate is no swarm device's ---------------------------------

def test_a_viewer_certificate_cannot_fetch_swarm_blobs(tmp_path):
    """A viewer (trusted to watch a dashboard) holds a certificate of the project's CA whose
    name the blob server's allowed() check admits; it must still not fetch model blobs."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    server_id = ca.issue("peer-b", tmp_path / "b", hosts=("127.0.0.1",), server=True,
                         client=True)
    device = ca.issue("peer-c", tmp_path / "c", hosts=("127.0.0.1",), server=True, client=True)
    viewer = ca.enroll("peer-a", tmp_path / "viewer", viewer=True)
    store = BlobStore()
    sha = store.put(b"model bytes " * 100)
    with BlobServer(store, server_id, crl=tmp_path / "ca" / "crl.pem",
                    allowed=lambda n: None) as server:
        with pytest.raises(TransportError, match="'peer-a' is a dashboard viewer's certificate"):
            fetch_blob(server.address, sha, viewer, max_bytes=MiB, timeout=10)
        assert server.served == 0
        assert fetch_blob(server.address, sha, device, max_bytes=MiB, timeout=10) \
            == b"model bytes " * 100


def test_every_issuing_path_keeps_one_name_one_role(tmp_path):
    """CA.issue (what the swarm's registrar calls) enforces the role check of CA.enroll: a
    viewer's name cannot get a device's certificate, nor a device's name a viewer's."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.enroll("alice", tmp_path / "v", viewer=True)
    with pytest.raises(ConfigError, match="'alice' is enrolled as a dashboard viewer"):
        ca.issue("alice", tmp_path / "d", hosts=("127.0.0.1",), server=True, client=True)
    ca.issue("bob", tmp_path / "d", hosts=("127.0.0.1",), server=True, client=True)
    with pytest.raises(ConfigError, match="'bob' is enrolled as a training client"):
        ca.issue("bob", tmp_path / "v", viewer=True)
    ca.issue("bob", tmp_path / "again", server=True, client=True)  # same role again: fine


def test_a_viewer_name_cannot_be_enrolled_as_a_swarm_device(etcd):
    """The registrar issues through CA.issue: enrolling a viewer's name as a device would make
    the viewer's own certificate an etcd credential with the device's role."""
    name = _uid("alice")
    etcd.ca.enroll(name, etcd.root / "viewers" / name, viewer=True)
    with pytest.raises(ConfigError, match="enrolled as a dashboard viewer"):
        etcd.registrar.enroll(name, etcd.root / "devices" / name)
    assert name not in Ledger(etcd.admin).enrolled()
    assert not (etcd.root / "devices" / name / f"{name}.crt").exists()


# -- F7: entries nobody can read are never written ---------------------------------------------

@pytest.mark.parametrize("job", ["", "team/a", "a/b/c"])
def test_append_refuses_an_entry_under_a_key_no_reader_parses(job):
    """A job name that is empty or holds '/' gives a key that parse_entry_key rejects: every
    reader would count the entry as junk, so the device would train alone without knowing."""
    from shoal.credentials import RunKeys
    keys, store = RunKeys(), MemoryStore()
    store.create(registry_key("a"), registry_value("a", keys.public("a")))
    ledger = Ledger(store)
    with pytest.raises(LedgerError, match=r"job '.*'.*no entry key.*non-empty and hold no '/'"):
        ledger.append(Entry(job, 1, "a", "update", 0, blob="ab" * 32, base="b" * 64,
                            examples=1.0, endpoint="127.0.0.1:1"), keys.for_node("a"))
    assert store.revision == 1  # nothing was written
    ledger.append(Entry("ok", 1, "a", "update", 0, blob="ab" * 32, base="b" * 64,
                        examples=1.0, endpoint="127.0.0.1:1"), keys.for_node("a"))
    assert list(ledger.read_round("ok", 1).updates) == ["a"]
