"""Weights blobs: canonical bytes, the bounded store, and peer-to-peer fetch over mutual TLS."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import torch

from shoal.errors import TransportError, UpdateError
from shoal.ledger.blob_service import (
    MAX_REQUEST_BYTES,
    METHOD,
    BlobClient,
    BlobServer,
    fetch_blob,
)
from shoal.ledger.blobs import (
    BlobError,
    BlobStore,
    blob_bytes,
    blob_hash,
    blob_params,
)
from shoal.net.ca import CertificateAuthority, Identity

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _no_ca_bundles(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine sets CA bundles for HTTP clients; the tests pass their own CA explicitly.
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
                "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        monkeypatch.delenv(var, raising=False)


class Pki:
    def __init__(self, root: Path):
        self.root = root
        self.ca = CertificateAuthority.init(root / "ca")
        self.ids = {n: self.ca.issue(n, root / "nodes", hosts=("127.0.0.1",), server=True,
                                     client=True)
                    for n in ("peer-a", "peer-b", "peer-c", "peer-revoked")}
        foreign = CertificateAuthority.init(root / "foreign-ca")
        self.foreign = foreign.issue("peer-b", root / "foreign", hosts=("127.0.0.1",),
                                     server=True, client=True)
        self.crl = root / "ca" / "crl.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("blobs"))


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(1200, 1000, generator=g),  # 4.8 MB: several chunks
        "layer.bias": torch.randn(7, generator=g, dtype=torch.float64),
        "half": torch.randn(3, 4, generator=g).half(),
        "brain": torch.randn(5, generator=g).bfloat16(),
        "bytes": torch.arange(10, dtype=torch.uint8),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "i16": torch.tensor([-3, 300], dtype=torch.int16),
        "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
        "steps": torch.tensor(12345678901, dtype=torch.int64),  # 0-d
        "scale": torch.tensor(0.5),  # 0-d float
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
        "odd": torch.tensor([float("nan"), -0.0, float("inf")]),
        "t": torch.arange(6.0).reshape(2, 3).t(),  # not contiguous
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].contiguous().reshape(-1).view(torch.uint8),
                           b[k].contiguous().reshape(-1).view(torch.uint8)), k  # bit for bit


# -- serialization ------------------------------------------------------------------------------


def test_round_trip_keeps_names_dtypes_shapes_and_bits():
    p = _params()
    data = blob_bytes(p)
    assert len(data) > 4 * MiB
    _same(blob_params(data, template=p), p)  # the template's order
    back = blob_params(data)
    assert list(back) == sorted(p)  # without a template: sorted by name
    _same({k: p[k] for k in sorted(p)}, back)
    assert back["steps"].shape == () and back["steps"].item() == 12345678901


def test_bytes_and_hash_are_deterministic_across_order_copies_and_processes():
    p = _params()
    data = blob_bytes(p)
    shuffled = {k: v.clone().requires_grad_(v.is_floating_point())
                for k, v in reversed(list(p.items()))}
    assert blob_bytes(shuffled) == data
    assert blob_bytes(blob_params(data)) == data
    small = {"b": torch.arange(5, dtype=torch.int16), "a": torch.linspace(0, 1, 7).double(),
             "c": torch.tensor(True)}
    code = ("import torch; from shoal.ledger.blobs import blob_bytes, blob_hash; "
            "print(blob_hash(blob_bytes({'a': torch.linspace(0, 1, 7).double(), "
            "'c': torch.tensor(True), 'b': torch.arange(5, dtype=torch.int16)})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == blob_hash(blob_bytes(small))
    assert blob_hash(data) == blob_hash(bytes(data)) != blob_hash(blob_bytes(small))


def test_blob_params_checks_the_template():
    p = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    data = blob_bytes(p)
    with pytest.raises(UpdateError, match="missing 'x'"):
        blob_params(data, {**p, "x": torch.zeros(1)})
    with pytest.raises(UpdateError, match=r"'w' has shape \(2, 3\), expected \(3, 2\)"):
        blob_params(data, {**p, "w": torch.zeros(3, 2)})
    with pytest.raises(UpdateError, match="'b' has dtype torch.float32, expected torch.float64"):
        blob_params(data, {**p, "b": torch.zeros(3, dtype=torch.float64)})


def test_blob_params_refuses_bytes_that_are_not_a_canonical_blob():
    data = blob_bytes({"w": torch.ones(4), "b": torch.zeros(2)})
    with pytest.raises(BlobError, match="shorter than"):
        blob_params(b"SHOL")
    with pytest.raises(BlobError, match="expected b'SHOLBLOB'"):
        blob_params(b"X" * 8 + data[8:])
    with pytest.raises(BlobError, match="version 9"):
        blob_params(data[:8] + struct.pack(">H", 9) + data[10:])
    with pytest.raises(BlobError, match="declares 24 data bytes, it holds 23"):
        blob_params(data[:-1])
    with pytest.raises(BlobError, match="declares 24 data bytes, it holds 25"):
        blob_params(data + b"\0")
    hlen = struct.unpack_from(">I", data, 10)[0]
    head = json.loads(data[14:14 + hlen])
    for bad in ({"tensors": head["tensors"][::-1]},  # unsorted
                {"tensors": [head["tensors"][0]] * 2}):  # repeated
        raw = json.dumps(bad, separators=(",", ":")).encode()
        with pytest.raises(BlobError, match="not canonical"):
            blob_params(data[:10] + struct.pack(">I", len(raw)) + raw + data[14 + hlen:])
    spaced = json.dumps(head).encode()  # the same header with spaces
    with pytest.raises(BlobError, match="not canonical"):
        blob_params(data[:10] + struct.pack(">I", len(spaced)) + spaced + data[14 + hlen:])
    deep = b'{"tensors":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(BlobError, match="deeper"):
        blob_params(data[:10] + struct.pack(">I", len(deep)) + deep)
    for bad_entry in (["w", "complex64", [4]], ["w", "float32", [-4]], ["w", "float32", [True]],
                      ["w", "float32"]):
        raw = json.dumps({"tensors": [bad_entry]}, separators=(",", ":")).encode()
        with pytest.raises(BlobError, match="bad header"):
            blob_params(data[:10] + struct.pack(">I", len(raw)) + raw)


def test_blob_bytes_refuses_what_it_cannot_write():
    with pytest.raises(UpdateError, match="dtype torch.complex64"):
        blob_bytes({"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(UpdateError, match="expected a tensor"):
        blob_bytes({"z": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(UpdateError, match="dense"):
        blob_bytes({"z": torch.eye(3).to_sparse()})


# -- the store ----------------------------------------------------------------------------------


def test_store_evicts_least_recently_used_blobs_not_kept():
    store = BlobStore(limit_bytes=100)
    a, b, c = (store.put(bytes([i]) * 40) for i in range(3))
    assert a not in store and [b, c] == store.hashes() and store.nbytes == 80
    assert store.get(a) is None and store.get(b) == bytes([1]) * 40  # b is now the newest
    d = store.put(bytes([3]) * 40)
    assert c not in store and store.hashes() == [b, d]
    store.keep([b, d])
    with pytest.raises(BlobError, match="kept blob"):
        store.put(b"x" * 40)  # only kept blobs to evict: refused, nothing stored
    assert store.hashes() == [b, d] and store.nbytes == 80
    with pytest.raises(BlobError, match="at most 100 bytes"):
        store.put(b"x" * 101)
    assert store.put(bytes([1]) * 40) == b  # the same bytes again: no second copy
    assert store.nbytes == 80
    store.keep([d])
    e = store.put(b"e" * 50)
    assert store.hashes() == [d, e] and store.nbytes == 90
    assert store.discard(d) and not store.discard(d) and store.nbytes == 50 and len(store) == 1
    assert e == blob_hash(b"e" * 50)


def test_store_stays_bounded_under_concurrent_puts():
    store = BlobStore(limit_bytes=10_000)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                store.put(f"{t}-{i}".encode() * 100)
                assert store.nbytes <= 10_000
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    held = [store.get(s) for s in store.hashes()]
    assert store.nbytes == sum(len(h or b"") for h in held) <= 10_000


# -- fetch over mutual TLS ----------------------------------------------------------------------


class TamperedStore(BlobStore):
    """A lying peer: serves other bytes under the hash asked for."""

    def get(self, sha256: str) -> bytes | None:
        data = super().get(sha256)
        return None if data is None else data[:-1] + bytes([data[-1] ^ 1])


class BlockingStore(BlobStore):
    """Holds every fetch in ``get`` until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def get(self, sha256: str) -> bytes | None:
        self.entered.set()
        self.release.wait(10)
        return super().get(sha256)


def test_fetch_over_mtls_returns_exactly_the_blob(pki: Pki):
    p = _params()
    data = blob_bytes(p)
    store = BlobStore()
    sha = store.put(data)
    with BlobServer(store, pki.ids["peer-a"], crl=pki.crl) as server:
        assert server.address.startswith("127.0.0.1:")
        got = fetch_blob(server.address, sha, pki.ids["peer-b"], max_bytes=64 * MiB)
        assert got == data
        _same(blob_params(got, template=p), p)
        with BlobClient(pki.ids["peer-c"], max_bytes=64 * MiB) as client:
            other = store.put(b"small blob")
            assert client.fetch(server.address, sha) == data
            assert client.fetch(server.address, other.upper()) == b"small blob"
        with pytest.raises(TransportError, match="after close"):
            client.fetch(server.address, sha)
        assert server.served == 3 and server.bytes_served == 2 * len(data) + 10


def test_a_lying_peer_is_caught_by_the_hash(pki: Pki):
    store = TamperedStore()
    sha = store.put(blob_bytes({"w": torch.ones(1000)}))
    with BlobServer(store, pki.ids["peer-a"], crl=pki.crl) as server, \
            pytest.raises(BlobError, match="differs from the hash asked for") as e:
        fetch_blob(server.address, sha, pki.ids["peer-b"], max_bytes=MiB)
    assert server.address in str(e.value) and sha in str(e.value)
    assert e.value.address == server.address and e.value.sha256 == sha


def test_a_certificate_of_another_ca_cannot_fetch(pki: Pki):
    store = BlobStore()
    sha = store.put(b"secret weights")
    with BlobServer(store, pki.ids["peer-a"], crl=pki.crl) as server:
        with pytest.raises(TransportError, match="TLS") as e:
            fetch_blob(server.address, sha, pki.foreign, max_bytes=MiB, timeout=10)
        assert not isinstance(e.value, BlobError)
        # The project's CA certificate to verify the server, but a foreign client certificate:
        # the server's handshake refuses it.
        mixed = Identity(pki.foreign.key, pki.foreign.cert, pki.ids["peer-b"].ca)
        with pytest.raises(TransportError, match="refused this node's certificate"):
            fetch_blob(server.address, sha, mixed, max_bytes=MiB, timeout=10)
        # A host name the server's certificate does not name.
        other = server.address.replace("127.0.0.1", "localhost")
        with pytest.raises(TransportError, match="host-name mismatch"):
            fetch_blob(other, sha, pki.ids["peer-b"], max_bytes=MiB, timeout=10)
        assert server.served == 0


def test_a_revoked_certificate_cannot_fetch(pki: Pki):
    store = BlobStore()
    sha = store.put(b"weights")
    with BlobServer(store, pki.ids["peer-a"], crl=pki.crl) as server:
        assert fetch_blob(server.address, sha, pki.ids["peer-revoked"], max_bytes=MiB) \
            == b"weights"
        pki.ca.revoke("peer-revoked")  # the server re-reads the CRL when it changes
        with pytest.raises(TransportError, match="'peer-revoked'.*is revoked"):
            fetch_blob(server.address, sha, pki.ids["peer-revoked"], max_bytes=MiB)
        assert fetch_blob(server.address, sha, pki.ids["peer-b"], max_bytes=MiB) == b"weights"


def test_allowed_refuses_with_its_reason_and_fails_closed(pki: Pki):
    store = BlobStore()
    sha = store.put(b"weights")

    def allowed(node: str) -> str | None:
        return None if node == "peer-b" else f"{node} is not enrolled on the ledger"

    with BlobServer(store, pki.ids["peer-a"], crl=pki.crl, allowed=allowed) as server:
        assert fetch_blob(server.address, sha, pki.ids["peer-b"], max_bytes=MiB) == b"weights"
        with pytest.raises(TransportError, match="peer-c is not enrolled on the ledger"):
            fetch_blob(server.address, sha, pki.ids["peer-c"], max_bytes=MiB)

    def broken(node: str) -> str | None:
        raise RuntimeError("ledger unreachable")

    with BlobServer(store, pki.ids["peer-a"], crl=pki.crl, allowed=broken) as server, \
            pytest.raises(TransportError, match="could not check it.*ledger unreachable"):
        fetch_blob(server.address, sha, pki.ids["peer-b"], max_bytes=MiB)


def test_unknown_hash_bad_requests_and_max_bytes(pki: Pki):
    store = BlobStore()
    sha = store.put(b"z" * 5000)
    with BlobServer(store, pki.ids["peer-a"], crl=pki.crl) as server, \
            BlobClient(pki.ids["peer-b"], max_bytes=MiB) as client:
        with pytest.raises(BlobError, match=f"not found.*no blob with SHA-256 {'0' * 64}"):
            client.fetch(server.address, "0" * 64)
        with pytest.raises(BlobError, match="not a SHA-256"):
            client.fetch(server.address, "abc")
        with pytest.raises(BlobError, match="5000 bytes, over the limit of 4999 bytes"):
            client.fetch(server.address, sha, max_bytes=4999)
        assert client.fetch(server.address, sha, max_bytes=5000) == b"z" * 5000
        # Requests the client never sends: malformed, and over the size limit.
        channel = client._channel(server.address, None)
        call = channel.unary_stream(METHOD)
        for bad in (b"not json", b'{"sha256": 5}', b'{"sha256": "' + b"A" * 64 + b'"}',
                    b'{"sha256": "' + sha.encode() + b'", "x": 1}'):
            with pytest.raises(grpc.RpcError) as e:
                list(call(bad, timeout=5))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed fetch request" in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            list(call(b" " * (MAX_REQUEST_BYTES + 1), timeout=5))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_concurrent_fetches_per_node_are_bounded(pki: Pki):
    store = BlockingStore()
    sha = store.put(b"weights")
    results: list[bytes] = []
    with BlobServer(store, pki.ids["peer-a"], crl=pki.crl, max_streams_per_node=1) as server:
        first = threading.Thread(target=lambda: results.append(fetch_blob(
            server.address, sha, pki.ids["peer-b"], max_bytes=MiB)))
        first.start()
        assert store.entered.wait(10)
        try:
            with pytest.raises(TransportError, match="max_streams_per_node=1"):
                fetch_blob(server.address, sha, pki.ids["peer-b"], max_bytes=MiB)
        finally:
            store.release.set()
            first.join(10)
        assert results == [b"weights"]


def test_nothing_listening_is_a_clear_transport_error(pki: Pki):
    with BlobServer(BlobStore(), pki.ids["peer-a"], crl=None) as server:
        address = server.address
    with pytest.raises(TransportError, match="nothing is listening"):
        fetch_blob(address, "0" * 64, pki.ids["peer-b"], max_bytes=MiB, timeout=5)
