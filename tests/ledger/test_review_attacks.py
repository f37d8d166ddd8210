"""Attacks from an adversarial review of the swarm ledger and the blob service, each written
as the attack: what a hostile device or certificate holder does, and what must hold anyway."""

from __future__ import annotations

import threading
import uuid

import pytest
from aetcd.rpc import rpc_pb2

from shoal.errors import ConfigError, TransportError
from shoal.ledger import etcd_watch
from shoal.ledger.blob_service import BlobServer, fetch_blob
from shoal.ledger.blobs import BlobStore
from shoal.ledger.entry import Entry
from shoal.ledger.etcd import MAX_TXN_KEYS, EtcdStore
from shoal.ledger.etcd_watch import KeyStream
from shoal.ledger.keys import (
    KINDS,
    entry_key,
    peer_prefix,
    peers_prefix,
    registry_key,
    registry_value,
    round_prefix,
)
from shoal.ledger.ledger import Ledger, LedgerError
from shoal.ledger.store import MemoryStore
from shoal.net.ca import CertificateAuthority
from shoal.net.limits import LogLimiter

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


# -- F4 and friends: values near etcd's request limit ------------------------------------------

BIG = 1_450_000
"""A value just under etcd's 1.5 MiB request limit: what RBAC lets any device write, as many
times as it likes, under its own prefix."""


def _flood(store, keys, value: bytes = b"x" * BIG) -> None:
    """Write ``value`` under each of ``keys`` as the device of ``store`` (a plain put: the
    ledger would never write such a thing, a hostile device does)."""
    for key in keys:
        req = rpc_pb2.PutRequest(key=key.encode(), value=value)
        store._call("flood", key, lambda m, t, r, req=req: m.kv.Put(req, timeout=t))


def _update(job: str, round: int, device: str) -> Entry:
    return Entry(job, round, device, "update", 0, blob="ab" * 32, base="b" * 64, examples=10.0,
                 endpoint="127.0.0.1:1")


def test_big_junk_values_under_one_device_do_not_stop_the_audit_of_the_others(etcd):
    """50 junk keys of 1.45 MB (70 MB) under the attacker's prefix of the job: more than one
    response may hold. The audit reads keys without values and reads entry keys only, so it
    reports the junk and audits every device."""
    job = _uid("audit")
    names = {s: _uid(s) for s in ("evil", "alice", "bob")}
    idents = {s: etcd.registrar.enroll(d, etcd.root / "devices" / d) for s, d in names.items()}
    stores = {s: etcd.cluster.store(i.tls, timeout=30.0) for s, i in idents.items()}
    try:
        Ledger(stores["alice"]).append(_update(job, 1, names["alice"]), idents["alice"].signer())
        Ledger(stores["evil"]).append(_update(job, 1, names["evil"]), idents["evil"].signer())
        _flood(stores["evil"], [f"{peer_prefix(names['evil'])}{job}/j{i}" for i in range(50)])
        auditor = Ledger(stores["bob"])
        problems = auditor.audit(job)
        prefix = f"{peer_prefix(names['evil'])}{job}/"
        assert problems == [f"{names['evil']!r} wrote 50 keys under {prefix!r} that are not "
                            "entry keys; ignored"]
        assert not any(names["alice"] in p for p in problems)
        assert auditor.head(job, names["evil"])[0] == 1
    finally:
        for st in stores.values():
            st.close()


def test_colluding_devices_filling_their_entry_keys_cannot_make_a_round_unreadable(etcd):
    """Eight devices each fill their own six entry keys of rounds 1 and 2 (what a peer reads
    together) with 1.45 MB of junk: 48 such keys in one transaction of the old read (up to 126
    keys) answer 70 MB, over max_read_bytes. Reads are chunked so no answer can exceed it, and
    the junk is refused as no entry."""
    job = _uid("collude")
    evil = [_uid(f"evil{i}") for i in range(8)]
    honest = {s: _uid(s) for s in ("alice", "bob")}
    idents = {d: etcd.registrar.enroll(d, etcd.root / "devices" / d)
              for d in [*honest.values(), *evil]}
    stores = {d: etcd.cluster.store(i.tls, timeout=30.0) for d, i in idents.items()}
    try:
        alice, bob = honest["alice"], honest["bob"]
        Ledger(stores[alice]).append(_update(job, 2, alice), idents[alice].signer())
        for d in evil:
            _flood(stores[d], [entry_key(d, job, r, k) for r in (1, 2) for k in KINDS])
        reader = Ledger(stores[bob])
        last, view = reader.read_rounds(job, [1, 2])
        assert list(view.updates) == [alice]
        assert not last.updates and not view.closes and not view.merged
        refused = [p for p in reader.problems if "bytes" in p and "refused" in p]
        assert {d for d in evil if any(d in p for p in refused)} == set(evil)
    finally:
        for st in stores.values():
            st.close()


def test_a_compaction_between_the_transactions_of_one_read_restarts_the_read(etcd):
    """A read of more keys than one transaction holds pins the later transactions to the first
    one's revision; etcd compacting that revision in between (OUT_OF_RANGE) makes the read
    start again at a new revision instead of failing."""
    base = f"/shoal/peers/{_uid('compact')}/"
    keys = [f"{base}{i:03d}" for i in range(MAX_TXN_KEYS + 5)]
    for k in keys:
        etcd.admin.put(k, b"old")
    store = etcd.admin
    real = store._call
    reads = []

    def racing(what, key, fn, **kw):
        got = real(what, key, fn, **kw)
        if what == "read":
            reads.append(int(got.header.revision))
            if len(reads) == 1:  # between the first transaction and the second
                rev = store.put(keys[-1], b"new")
                real("compact", "", lambda m, t, r: m.kv.Compact(
                    rpc_pb2.CompactionRequest(revision=rev, physical=True), timeout=t))
        return got

    store._call = racing
    try:
        _, got, revision = store.read((), keys)
    finally:
        del store._call
    assert len(reads) >= 3 and revision > reads[0]
    assert [r.value for r in got] == [b"old"] * (len(keys) - 1) + [b"new"]


# -- F5: the shared watch stream after a flood of big values -----------------------------------

def _flooded_round(etcd, value_size: int, count: int):
    """alice, bob and a hostile device; the device writes ``count`` junk keys of
    ``value_size`` bytes under its own round prefix, then alice writes her entry. What bob's
    stream, reopened from before the flood (as after its member failed), must deliver."""
    job = _uid("watch")
    names = {s: _uid(s) for s in ("evil", "alice", "bob")}
    idents = {s: etcd.registrar.enroll(d, etcd.root / "devices" / d) for s, d in names.items()}
    stores = {s: etcd.cluster.store(i.tls, timeout=30.0) for s, i in idents.items()}
    before = Ledger(stores["bob"]).read_round(job, 1).revision
    _flood(stores["evil"], [f"{round_prefix(names['evil'], job, 1)}junk-{i}"
                            for i in range(count)], b"x" * value_size)
    Ledger(stores["alice"]).append(_update(job, 1, names["alice"]), idents["alice"].signer())
    return stores, idents, before, entry_key(names["alice"], job, 1, "update")


def test_a_reopened_watch_gets_past_a_flood_bigger_than_one_answer(etcd):
    """60 values of 1.45 MB (87 MB) written while the stream was away: in one answer that is
    over max_read_bytes, and every reopen asked for the same answer again (healthy all the
    while, never delivering). Fragmented answers deliver alice's entry behind the flood."""
    stores, _, before, key = _flooded_round(etcd, BIG, 60)
    try:
        stream = KeyStream(stores["bob"], peers_prefix(), before, interest=[key])
        try:
            got = stream.get_keys([key], before, 30.0)
            assert got and got[0].key == key
            assert stream.healthy() and stream.ignored == 60
        finally:
            stream.stop()
    finally:
        for st in stores.values():
            st.close()


def test_a_watch_that_keeps_failing_at_one_revision_gives_up_and_is_replaced(etcd, caplog,
                                                                            monkeypatch):
    """A stream whose answers this reader cannot take (here: a reader accepting 64 KiB, and
    values of 200 kB) fails with RESOURCE_EXHAUSTED from the same revision every time. It must
    turn unhealthy (not retry forever looking healthy), log it, and watch_keys must still
    deliver the entry, by a fresh read and a stream from its revision."""
    monkeypatch.setattr(etcd_watch, "_warn", LogLimiter(3))  # no earlier test's warnings
    stores, idents, before, key = _flooded_round(etcd, 200_000, 3)
    small = EtcdStore(etcd.cluster.endpoints, idents["bob"].tls, timeout=30.0,
                      max_read_bytes=64 * 1024)
    try:
        stream = KeyStream(small, peers_prefix(), before, interest=[key])
        try:
            with caplog.at_level("WARNING"):
                assert stream.get_keys([key], before, 30.0) is None  # gave up
            assert not stream.healthy()
            assert "RESOURCE_EXHAUSTED" in (stream.failed or "")
            assert any("giving it up" in r.getMessage() for r in caplog.records)
        finally:
            stream.stop()
        got = small.watch_keys(peers_prefix(), [key], before, 30.0)
        assert [r.key for r in got] == [key]
    finally:
        small.close()
        for st in stores.values():
            st.close()


def test_a_fragment_never_moves_the_stream_past_a_revision_it_may_not_have_whole():
    """etcd may split one revision's events (one transaction's puts) across fragments: a
    stream that fails between them reopens from that revision, not after it."""
    from aetcd.rpc import kv_pb2

    def events(*revs):
        return [kv_pb2.Event(kv=kv_pb2.KeyValue(key=f"/k{i}".encode(), mod_revision=r))
                for i, r in enumerate(revs)]
    stream = object.__new__(KeyStream)
    stream.seen, stream.interest, stream.latest, stream.ignored = 4, {}, {}, 0
    stream._cond = threading.Condition()
    stream._keep(events(5, 6, 6), fragment=True)
    assert stream.seen == 5
    stream._keep(events(6, 7), fragment=False)
    assert stream.seen == 7 and stream.ignored == 5
