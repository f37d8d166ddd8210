"""The ledger's etcd store and enrollment: write-once creates, reads at one revision, watches
of exact keys (``watch_keys``), per-device RBAC over mutual TLS (CN = etcd user), revocation, the administrator's insider
power, and fail-over between members. The etcd tests share one 3-member cluster
(``conftest.etcd``); the registrar's in-process tests need no etcd."""

from __future__ import annotations

import json
import stat
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shoal.errors import ConfigError, TransportError
from shoal.ledger.cluster import EtcdCluster
from shoal.ledger.enroll import (
    Grant,
    RecordedAccess,
    Registrar,
    SwarmIdentity,
    load_signing_key,
)
from shoal.ledger.etcd import EtcdStore, LedgerAccessError, prefix_end
from shoal.ledger.etcd_watch import KeyStream
from shoal.ledger.keys import (
    entry_key,
    peer_prefix,
    peers_prefix,
    registry_key,
    registry_value,
    revoked_key,
)
from shoal.ledger.store import MemoryStore
from shoal.net.ca import CertificateAuthority


def _uid(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def _enroll(etcd, stem: str):
    device = _uid(stem)
    ident = etcd.registrar.enroll(device, etcd.root / "devices" / device)
    return device, ident, etcd.cluster.store(ident.tls, timeout=3.0)


# -- the KeyValueStore on etcd ------------------------------------------------------------------


def test_create_is_write_once(etcd):
    key = f"/test/{_uid('once')}"
    rev = etcd.admin.create(key, b"first")
    assert isinstance(rev, int) and rev > 0
    assert etcd.admin.create(key, b"second") is None
    (records,), at = etcd.admin.ranges([key])
    assert at >= rev
    assert [(r.value, r.create_revision, r.mod_revision, r.version) for r in records] == [
        (b"first", rev, rev, 1)]


def test_ranges_read_every_prefix_at_one_revision(etcd):
    base = f"/test/{_uid('ranges')}"
    revs = [etcd.admin.create(f"{base}/b/{k}", k.encode()) for k in ("z", "a", "m")]
    revs.append(etcd.admin.create(f"{base}/a/only", b"x"))
    revs.append(etcd.admin.create(f"{base}/bz", b"not under b/"))
    (a, b, empty), at = etcd.admin.ranges([f"{base}/a/", f"{base}/b/", f"{base}/c/"])
    assert [r.key for r in b] == [f"{base}/b/a", f"{base}/b/m", f"{base}/b/z"]  # sorted
    assert [r.value for r in a] == [b"x"] and empty == []
    assert at >= max(r for r in revs if r is not None)
    # The revision is the store's: a later read sees the same records at a higher revision.
    etcd.admin.create(f"{base}/later", b"")
    (b2,), at2 = etcd.admin.ranges([f"{base}/b/"])
    assert at2 > at and b2 == b
    nothing, at3 = etcd.admin.ranges([])
    assert nothing == [] and at3 >= at2


def test_reads_are_bounded(etcd):
    base = f"/test/{_uid('bound')}/"
    for i in range(3):
        etcd.admin.put(f"{base}{i}", b"v")
    with EtcdStore(etcd.cluster.endpoints, etcd.cluster.admin, max_records=2) as small:
        with pytest.raises(TransportError, match="more than max_records=2"):
            small.ranges([base])
        (two,), _ = small.ranges([f"{base}1"])
        assert len(two) == 1


def test_watch_keys_wakes_on_a_write_and_times_out_otherwise(etcd):
    prefix = f"/test/{_uid('wait')}/"
    key = f"{prefix}x"
    _, rev = etcd.admin.ranges([prefix])
    t = time.monotonic()
    assert etcd.admin.watch_keys(prefix, [key], rev, 0.3) == []
    assert 0.25 <= time.monotonic() - t < 2.0
    # Writes to other keys, under the prefix or beside it, neither wake a caller nor are
    # returned: before the call (the read) or during it (the stream).
    etcd.admin.create(f"{prefix[:-1]}-sibling/x", b"")
    etcd.admin.create(f"{prefix}other", b"")
    t = time.monotonic()
    assert etcd.admin.watch_keys(prefix, [key], rev, 0.3) == []
    assert 0.25 <= time.monotonic() - t < 2.0
    other = threading.Timer(0.1, etcd.admin.create, (f"{prefix}xx", b""))
    timer = threading.Timer(0.4, etcd.admin.create, (key, b"v"))
    other.start()
    timer.start()
    t = time.monotonic()
    got = etcd.admin.watch_keys(prefix, [key, f"{prefix}never"], rev, 10.0)
    assert 0.3 <= time.monotonic() - t < 5.0
    other.join()
    timer.join()
    assert [(r.key, r.value) for r in got] == [(key, b"v")]
    # A write already made after `revision` is returned at once, even with no time to wait.
    t = time.monotonic()
    assert etcd.admin.watch_keys(prefix, [key], rev, 5.0) == got
    assert etcd.admin.watch_keys(prefix, [key], rev, 0) == got
    assert time.monotonic() - t < 2.0
    _, now = etcd.admin.ranges([prefix])
    assert etcd.admin.watch_keys(prefix, [key], now, 0) == []
    with pytest.raises(ValueError, match="under"):
        etcd.admin.watch_keys(prefix, [f"{prefix[:-1]}-sibling/x"], rev, 0)


def test_watch_keys_shares_one_stream_per_prefix_and_close_ends_it(etcd):
    prefix = f"/test/{_uid('stream')}/"
    threads = threading.active_count()
    with etcd.cluster.store() as s:
        _, rev = s.ranges([prefix])
        for i in range(3):  # calls that time out leave the one stream, and no thread, behind
            assert s.watch_keys(prefix, [f"{prefix}{i}"], rev, 0.05) == []
        streams = [t for t in threading.enumerate() if t.name == f"etcd-watch {prefix}"]
        assert len(streams) == 1
    streams[0].join(5.0)
    assert not streams[0].is_alive()
    time.sleep(0.2)
    assert threading.active_count() <= threads


# -- RBAC: the certificate's CN is the etcd user ------------------------------------------------


def test_enrolled_device_writes_its_own_prefix_and_reads_everyones(etcd):
    a, ident_a, store_a = _enroll(etcd, "dev-a")
    b, _, store_b = _enroll(etcd, "dev-b")
    with store_a, store_b:
        assert store_a.device == a
        key = entry_key(a, "job", 1, "update")
        rev = store_a.create(key, b"entry of a")
        assert rev is not None
        (mine, registry), _ = store_b.ranges([peer_prefix(a), registry_key(a)])
        assert [r.value for r in mine] == [b"entry of a"]
        public = ident_a.signer().credential()
        assert [r.value for r in registry] == [registry_value(a, public)]
        got = store_b.watch_keys(peers_prefix(), [key], rev - 1, 2.0)
        assert [r.value for r in got] == [b"entry of a"]
        # b's watch stream on the peers' prefix delivers what a writes next.
        later = entry_key(a, "job", 1, "close")
        timer = threading.Timer(0.3, store_a.create, (later, b"close of a"))
        timer.start()
        got = store_b.watch_keys(peers_prefix(), [later], rev, 5.0)
        timer.join()
        assert [r.value for r in got] == [b"close of a"]


def test_a_device_cannot_write_under_another_devices_prefix(etcd):
    a, _, store_a = _enroll(etcd, "dev-a")
    b, _, store_b = _enroll(etcd, "dev-b")
    with store_a, store_b:
        key = f"{peer_prefix(b)}job/00000001/update"
        with pytest.raises(LedgerAccessError, match="permission denied") as e:
            store_a.create(key, b"forged")
        assert e.value.key == key and e.value.device == a
        assert "shoal swarm enroll" in str(e.value) and key in str(e.value)
        for key in (registry_key(a), revoked_key(b), "/elsewhere/x"):  # registrar-only
            with pytest.raises(LedgerAccessError):
                store_a.create(key, b"x")
        with pytest.raises(LedgerAccessError):  # nor read outside the ledger's root
            store_a.ranges(["/elsewhere/"])
        (theirs,), _ = store_b.ranges([peer_prefix(b)])
        assert theirs == []


def test_a_certificate_from_another_ca_cannot_connect(etcd, tmp_path):
    other = CertificateAuthority.init(tmp_path / "other-ca")
    # The foreign certificate names our CA's certificate as trusted, but was not issued by it.
    ident = other.issue("mallory", tmp_path / "mallory", client=True)
    (tmp_path / "mallory" / "ca.crt").write_bytes((etcd.ca.dir / "ca.crt").read_bytes())
    t = time.monotonic()
    with EtcdStore(etcd.cluster.endpoints, ident, timeout=1.0) as s:
        with pytest.raises(TransportError) as e:
            s.ranges(["/shoal/"])
        assert not isinstance(e.value, LedgerAccessError)
        assert time.monotonic() - t < 5.0
        for ep in etcd.cluster.endpoints:
            assert ep in str(e.value)
        assert "UNAVAILABLE" in str(e.value)
        key = entry_key("alice", "job", 1, "update")
        with pytest.raises(TransportError) as e:
            s.watch_keys(peers_prefix(), [key], 0, 1.0)
        assert not isinstance(e.value, LedgerAccessError) and "UNAVAILABLE" in str(e.value)


def test_a_certificate_of_the_ca_without_enrollment_is_refused(etcd, tmp_path):
    ident = etcd.ca.issue(_uid("stranger"), tmp_path, client=True)
    with etcd.cluster.store(ident) as s:
        with pytest.raises(LedgerAccessError, match="must be enrolled"):
            s.ranges(["/shoal/"])
        with pytest.raises(LedgerAccessError):
            s.create(f"{peer_prefix(s.device)}x", b"v")
        key = entry_key("alice", "job", 1, "update")
        with pytest.raises(LedgerAccessError, match="must be enrolled"):
            s.watch_keys(peers_prefix(), [key], 0, 1.0)
        # The watch stream itself is refused too, not retried: its callers get the refusal.
        stream = KeyStream(s, peers_prefix(), 0, [key])
        try:
            with pytest.raises(LedgerAccessError, match="a watch of"):
                stream.get_keys([key], 0, 5.0)
            assert not stream.healthy()
        finally:
            stream.stop()


def test_a_revoked_device_can_neither_read_nor_write(etcd):
    c, ident, store_c = _enroll(etcd, "dev-c")
    with store_c:
        assert store_c.create(f"{peer_prefix(c)}before", b"v") is not None
        etcd.registrar.revoke(c, "laptop lost")
        # On the connection it already holds: etcd's RBAC refuses (its user is gone).
        with pytest.raises(LedgerAccessError):
            store_c.create(f"{peer_prefix(c)}after", b"v")
        with pytest.raises(LedgerAccessError):
            store_c.ranges([peer_prefix(c)])
    # A new connection: the members refuse the revoked certificate (CRL) at the handshake.
    with EtcdStore(etcd.cluster.endpoints, ident.tls, timeout=1.0) as fresh, \
            pytest.raises(TransportError):
        fresh.ranges(["/shoal/"])
    (rec, after), _ = etcd.admin.ranges([revoked_key(c), f"{peer_prefix(c)}after"])
    assert after == []
    assert json.loads(rec[0].value)["device"] == c
    assert json.loads(rec[0].value)["reason"] == "laptop lost"
    assert "time" in json.loads(rec[0].value)
    with pytest.raises(ConfigError, match="already revoked"):
        etcd.registrar.revoke(c, "again")
    with pytest.raises(ConfigError, match="was revoked"):
        etcd.registrar.enroll(c, etcd.root / "devices" / "again")


def test_the_registrar_can_rewrite_an_entry(etcd):
    # The insider power that only the entries' signatures can reveal.
    d, _, store = _enroll(etcd, "dev-d")
    key = f"{peer_prefix(d)}job/00000001/update"
    with store:
        store.create(key, b"honest")
        etcd.admin.put(key, b"rewritten")
        (records,), _ = store.ranges([key])
    assert records[0].value == b"rewritten" and records[0].version == 2
    assert etcd.admin.delete(key) is True and etcd.admin.delete(key) is False


def test_enrolling_an_enrolled_device_is_an_error(etcd):
    d, _, store = _enroll(etcd, "dev-e")
    store.close()
    with pytest.raises(ConfigError, match="already enrolled"):
        etcd.registrar.enroll(d, etcd.root / "devices" / "twice")
    for reserved in ("root", "registrar", "etcd-member-0"):
        with pytest.raises(ConfigError, match="reserved"):
            etcd.registrar.enroll(reserved, etcd.root / "devices" / "reserved")


# -- fail-over -----------------------------------------------------------------------------------


def test_reads_writes_and_watches_fail_over_when_a_member_dies(etcd):
    cluster = etcd.cluster
    prefix = f"/test/{_uid('failover')}/"
    with cluster.store(timeout=5.0) as s:
        assert s.create(f"{prefix}before", b"1") is not None  # talks to member 0
        assert s.watch_keys(prefix, [f"{prefix}woken"], 0, 0) == []  # a stream on member 0
        stream = s._key_tails[prefix]
        cluster.kill(0)
        try:
            t = time.monotonic()
            assert s.create(f"{prefix}after", b"2") is not None
            (records,), rev = s.ranges([prefix])
            assert [r.key for r in records] == [f"{prefix}after", f"{prefix}before"]
            assert time.monotonic() - t < 8.0
            timer = threading.Timer(0.2, s.create, (f"{prefix}woken", b"3"))
            timer.start()
            got = s.watch_keys(prefix, [f"{prefix}woken"], rev, 5.0)
            timer.join()
            assert [r.value for r in got] == [b"3"]
            assert s._key_tails[prefix] is stream  # the stream moved to a live member
            with EtcdStore(cluster.endpoints[:1], cluster.admin, timeout=0.5) as dead, \
                    pytest.raises(TransportError) as e:
                dead.ranges([prefix])
            assert cluster.endpoints[0] in str(e.value) and "UNAVAILABLE" in str(e.value)
        finally:
            cluster.restart(0)
    with EtcdStore(cluster.endpoints[:1], cluster.admin) as back:  # caught up on restart
        (records,), _ = back.ranges([prefix])
        assert len(records) == 3


def test_writes_go_on_when_the_leader_dies(etcd):
    cluster = etcd.cluster
    prefix = f"/test/{_uid('leader')}/"
    with cluster.store(timeout=5.0) as s:
        s.ranges([prefix])
        leader = cluster.leader()
        cluster.kill(leader)
        try:
            assert s.create(f"{prefix}x", b"1") is not None  # after a new election
            assert cluster.leader() != leader
            (records,), _ = s.ranges([prefix])
            assert [r.value for r in records] == [b"1"]
        finally:
            cluster.restart(leader)


# -- configuration -------------------------------------------------------------------------------


def test_endpoints_must_be_tls_host_ports(etcd):
    with pytest.raises(ConfigError, match="plain HTTP"):
        EtcdStore(["http://127.0.0.1:2379"], etcd.cluster.admin)
    with pytest.raises(ConfigError, match="host:port"):
        EtcdStore(["localhost"], etcd.cluster.admin)
    assert EtcdStore(["https://127.0.0.1:1/"], etcd.cluster.admin).endpoints == ["127.0.0.1:1"]


def test_prefix_end():
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"") == b"\0" and prefix_end(b"\xff\xff") == b"\0"


def test_a_missing_etcd_says_how_to_install_it(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(ConfigError, match="apt-get install etcd-server"):
        EtcdCluster(tmp_path / "c", ca, binary=str(tmp_path / "no-etcd"))


# -- the registrar in-process (no etcd) ----------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    access = RecordedAccess()
    return Registrar(MemoryStore(), ca, access=access), access, tmp_path


def test_an_in_process_store_needs_explicit_access_control(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(ConfigError, match="RecordedAccess"):
        Registrar(MemoryStore(), ca)


def test_enrollment_in_process_records_grants_keys_and_registry(local):
    registrar, access, tmp = local
    ident = registrar.enroll("hospital-a", tmp / "a")
    assert access.grants == {"hospital-a": Grant("/shoal/", "/shoal/peers/hospital-a/")}
    assert access.may_write("hospital-a", "/shoal/peers/hospital-a/j/1/update")
    assert not access.may_write("hospital-a", "/shoal/peers/hospital-b/j/1/update")
    assert access.may_read("hospital-a", "/shoal/registry/x")
    assert stat.S_IMODE(ident.signing_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ident.tls.key.stat().st_mode) == 0o600
    signer = ident.signer()
    assert signer.node_id == "hospital-a" and len(signer.credential()) == 32
    Ed25519PublicKey.from_public_bytes(signer.credential()).verify(signer.sign(b"m"), b"m")
    (reg,), _ = registrar.store.ranges([registry_key("hospital-a")])
    assert reg[0].value == registry_value("hospital-a", signer.credential())
    assert SwarmIdentity.load(tmp / "a", "hospital-a") == ident
    with pytest.raises(ConfigError, match="already enrolled"):
        registrar.enroll("hospital-a", tmp / "again")
    registrar.revoke("hospital-a", "left the consortium")
    assert access.grants == {} and access.revoked == ["hospital-a"]
    assert not access.may_read("hospital-a", "/shoal/registry/x")
    with pytest.raises(ConfigError, match="not enrolled"):
        registrar.revoke("nobody", "?")


def test_signing_keys_that_cannot_be_used_are_config_errors(local):
    registrar, _, tmp = local
    ident = registrar.enroll("hospital-b", tmp / "b", passphrase=b"secret")
    assert b"ENCRYPTED" in ident.signing_key.read_bytes()
    assert ident.signer().credential() == ident.signer(b"secret").credential()
    bare = SwarmIdentity(ident.device, ident.tls, ident.signing_key)
    with pytest.raises(ConfigError, match="no passphrase"):
        bare.signer()
    with pytest.raises(ConfigError, match="passphrase is wrong"):
        bare.signer(b"wrong")
    with pytest.raises(ConfigError, match="cannot read"):
        load_signing_key(tmp / "missing.sign.key")
    (tmp / "junk.key").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        load_signing_key(tmp / "junk.key")
    with pytest.raises(ConfigError, match="expected an Ed25519"):
        load_signing_key(ident.tls.key, b"secret")  # the TLS key: EC, not Ed25519
    with pytest.raises(ConfigError, match="no enrollment"):
        SwarmIdentity.load(tmp / "nowhere", "hospital-b")
