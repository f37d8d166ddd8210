"""Swarm peers as separate processes on loopback, against a 3-member etcd cluster over mutual
TLS that the tests start and stop themselves: agreement, parity with the simulation, faults
(a peer and an etcd member killed mid-run), and the deployed refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import shoal
from shoal.algorithms.swarm import model_hash
from shoal.errors import TransportError
from shoal.experiment import make_dataset, resolve_config
from shoal.ledger.blob_service import BlobClient
from shoal.ledger.cluster import ETCD_BINARY, EtcdCluster
from shoal.ledger.enroll import Registrar, SwarmIdentity
from shoal.ledger.etcd import LedgerAccessError
from shoal.ledger.ledger import Ledger
from shoal.net import CertificateAuthority
from shoal.net import swarm as swarm_net
from shoal.net.clientdata import split_federation
from shoal.net.swarm import SwarmNode

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None and not Path(ETCD_BINARY).exists(),
    reason="etcd is not installed (scripts/setup.sh installs Debian's etcd-server)")

_TLS_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")


@pytest.fixture(autouse=True)
def _no_ca_bundles(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _TLS_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def swarm_env(tmp_path_factory: pytest.TempPathFactory):
    for var in _TLS_ENV:  # the members and the peers' processes inherit this environment
        os.environ.pop(var, None)
    root = tmp_path_factory.mktemp("swarm")
    ca = CertificateAuthority.init(root / "ca")
    with EtcdCluster(root / "ledger", ca) as cluster:
        registrar = Registrar(cluster.store(), ca)
        yield root, ca, cluster, registrar


def _job(root: Path, cluster: EtcdCluster, name: str, peers: int, rounds: int,
         extra: str = "") -> Path:
    text = f"""
paradigm = "swarm"
baseline = false
[task]
name = "digits"
[data]
num_clients = {peers}
[federated]
rounds = {rounds}
clients_per_round = {peers}
[client]
max_steps = 4
[swarm]
job = "{name}"
endpoints = {json.dumps(cluster.endpoints)}
identity_dir = "{root / 'devices'}"
{extra}
"""
    path = root / f"{name}.toml"
    path.write_text(text)
    cfg = shoal.load_config(path)
    task = shoal.load_task("digits")
    split_federation(make_dataset(resolve_config(cfg, task), task), root / name / "data")
    return path


def _enroll(root: Path, ca: CertificateAuthority, registrar: Registrar, ids: list[str]) -> None:
    for d in ids:
        if not (root / "devices" / f"{d}.sign.key").exists():
            registrar.enroll(d, root / "devices")
    shutil.copyfile(ca.dir / "crl.pem", root / "devices" / "crl.pem")


def _peer(root: Path, job: Path, name: str, device: str) -> subprocess.Popen[bytes]:
    # One torch thread in every peer, as in the simulation they are compared with (a matmul's
    # summation order, and so its last bits, depends on the thread count).
    env = {**{k: v for k, v in os.environ.items() if k not in _TLS_ENV}, "OMP_NUM_THREADS": "1"}
    log = open(root / name / f"{device}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "shoal", "swarm", "join", str(job), "--node-id", device,
         "--data", str(root / name / "data" / f"{device}.npz"),
         "--out", str(root / name / "out" / device), "-v"],
        stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait(procs: list[subprocess.Popen[bytes]], root: Path, name: str) -> None:
    for p in procs:
        try:
            p.wait(240)
        except subprocess.TimeoutExpired:
            p.kill()
    logs = "\n".join(f"--- {f.name} ---\n{f.read_text()[-3000:]}"
                     for f in sorted((root / name).glob("*.log")))
    assert all(p.returncode == 0 for p in procs), logs


def _final_hash(root: Path, name: str, device: str) -> str:
    return model_hash(load_file(str(root / name / "out" / device / "model.safetensors")))


def test_peers_as_processes_agree_and_equal_the_simulation(swarm_env, tmp_path, one_thread):
    root, ca, cluster, registrar = swarm_env
    ids = [f"client-{i}" for i in range(3)]
    _enroll(root, ca, registrar, ids)
    job = _job(root, cluster, "parity", 3, 3)
    _wait([_peer(root, job, "parity", d) for d in ids], root, "parity")
    hashes = {_final_hash(root, "parity", d) for d in ids}
    assert len(hashes) == 1
    # The same job simulated in one process ends with the bit-identical model.
    cfg = shoal.load_config(job)
    shoal.run_experiment(cfg, tmp_path / "sim")
    assert model_hash(load_file(str(tmp_path / "sim" / "swarm" / "model.safetensors"))) in hashes
    with cluster.store() as store:
        assert Ledger(store).audit("parity") == []


def test_a_killed_peer_and_etcd_member_rejoin_and_no_round_is_lost(swarm_env):
    root, ca, cluster, registrar = swarm_env
    ids = [f"client-{i}" for i in range(4)]
    _enroll(root, ca, registrar, ids)
    rounds = 8
    job = _job(root, cluster, "faults", 4, rounds,
               "min_peers = 2\nclose_timeout_s = 3.0")
    procs = {d: _peer(root, job, "faults", d) for d in ids}
    with cluster.store(timeout=20.0) as store:
        ledger = Ledger(store)

        def merged(r: int) -> set[str]:
            return set(ledger.read_round("faults", r).merged)

        deadline = time.monotonic() + 180
        while not merged(2) and time.monotonic() < deadline:
            time.sleep(0.2)
        procs["client-3"].send_signal(signal.SIGKILL)  # a crash, mid-run
        procs["client-3"].wait(30)
        cluster.kill(0)  # and one of the three etcd members
        # client-3 may have published a round or two before it died; a later round is merged
        # by the other three alone (it must come: min_peers remain).
        without = None
        for r in range(3, rounds + 1):
            while not merged(r) and time.monotonic() < deadline:
                time.sleep(0.2)
            if merged(r) and "client-3" not in merged(r):
                without = r
                break
        assert without is not None, "the swarm stopped while min_peers remained"
        # The first merged entry makes the round visible; the other live peers record theirs a
        # moment later (each merges on its own), so wait for them rather than race them.
        while len(merged(without)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(merged(without)) >= 3, f"round {without}: merged by {sorted(merged(without))}"
        cluster.restart(0)
        procs["client-3"] = _peer(root, job, "faults", "client-3")  # rejoins
        _wait(list(procs.values()), root, "faults")
        for r in range(1, rounds + 1):
            view = ledger.read_round("faults", r)
            assert view.closes, f"round {r} was never closed"
            assert len(view.merged) >= 3, f"round {r}: merged by {sorted(view.merged)}"
            assert len({e.blob for e, _ in view.merged.values()}) == 1, f"round {r} disagrees"
        assert ledger.audit("faults") == []
    assert len({_final_hash(root, "faults", d) for d in ids}) == 1
    log = (root / "faults" / "client-3.log").read_text()
    assert "catches up to round" in log


def test_unenrolled_and_revoked_devices_are_refused(swarm_env, tmp_path, monkeypatch):
    root, ca, cluster, registrar = swarm_env
    ids = [f"client-{i}" for i in range(2)]
    _enroll(root, ca, registrar, ids)
    job = _job(root, cluster, "refusals", 2, 1, "close_timeout_s = 2.0")
    cfg = shoal.load_config(job)
    # a certificate from the project's CA, but never enrolled: etcd knows no such user
    stranger = ca.issue("stranger", tmp_path, hosts=("127.0.0.1",), server=True, client=True)
    from shoal.ledger.etcd import EtcdStore
    with EtcdStore(cluster.endpoints, stranger) as s, pytest.raises(LedgerAccessError):
        s.ranges(["/shoal/"])
    # a device enrolled and then revoked: no ledger, no blobs
    registrar.enroll("leaver", root / "devices")
    leaver = SwarmIdentity.load(root / "devices", "leaver")
    # The blob server learns of a revocation by watching the ledger, not from a cache's age:
    # with a cache kept for a minute, the revoked device is still refused at once.
    monkeypatch.setattr(swarm_net, "ALLOWED_CACHE_S", 60.0)
    with SwarmNode(cfg, "client-0", root / "refusals" / "data" / "client-0.npz") as node:
        data = node.store.put(b"not a blob, but served by hash")
        with BlobClient(leaver.tls) as c:
            assert c.fetch(node.blobs.address, data) == b"not a blob, but served by hash"
        registrar.revoke("leaver", "left the consortium")
        refused, deadline = None, time.monotonic() + 10
        while refused is None and time.monotonic() < deadline:
            try:
                with BlobClient(leaver.tls) as c:
                    c.fetch(node.blobs.address, data)
                time.sleep(0.05)
            except Exception as e:  # noqa: BLE001 - the refusal is what we wait for
                refused = e
        assert refused is not None and "not an enrolled" in str(refused), refused
        # a device enrolled while the node runs is served without waiting for the follower
        registrar.enroll("latecomer", root / "devices")
        late = SwarmIdentity.load(root / "devices", "latecomer")
        got, deadline = None, time.monotonic() + 5
        while got is None and time.monotonic() < deadline:
            try:
                with BlobClient(late.tls) as c:
                    got = c.fetch(node.blobs.address, data)
            except Exception:  # noqa: BLE001 - within the registry's re-read interval
                time.sleep(0.1)
        assert got == b"not a blob, but served by hash"
    # the members refuse its TLS handshake (the CA's revocation list), and etcd has no user of
    # that name any more
    with EtcdStore(cluster.endpoints, leaver.tls, timeout=2.0) as s, \
            pytest.raises(TransportError, match="revoked"):
        s.ranges(["/shoal/"])
    # a device writing under another's prefix: etcd's RBAC refuses it
    alice = SwarmIdentity.load(root / "devices", "client-1")
    with EtcdStore(cluster.endpoints, alice.tls) as s, pytest.raises(LedgerAccessError):
        s.create("/shoal/peers/client-0/refusals/00000001/update", b"{}")
