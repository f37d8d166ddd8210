"""A deployment's lifecycle: what the coordinator tells its clients when it stops, how long
clients wait for it, and what a client says when it cannot connect.

Real gRPC over mutual TLS on 127.0.0.1; every server is stopped by its test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.config import Config, load_config
from shoal.data.tasks import load_task
from shoal.errors import TransportError
from shoal.experiment import make_dataset, resolve_config
from shoal.message import Message
from shoal.net import CertificateAuthority, GrpcTransport, Identity, NodeClient
from shoal.net.clientdata import split_federation
from shoal.net.deploy import WaitForNodes, join, node_client, serve
from shoal.node import Handler, Node, NodeContext

from ._helpers import coordinator_identity, free_port, node_identity, running

JOB = """
seed = 3
[task]
name = "digits"
hidden = 16
[data]
partition = "iid"
num_clients = 2
[federated]
rounds = {rounds}
clients_per_round = 2
timeout_s = 60
[client]
epochs = 1
max_steps = 2
[network]
address = "127.0.0.1:{port}"
tls_dir = "{tls}"
min_nodes = 2
wait_s = 60
reconnect_max_s = 0.3
patience_s = {patience}
"""


class Deployment:
    """A CA whose directory is every party's tls_dir, a job config, one data file per client."""

    def __init__(self, root: Path, rounds: int = 4, patience: float = 60.0):
        self.root = root
        self.tls = root / "ca"
        self.ca = CertificateAuthority.init(self.tls)
        self.job = root / "job.toml"
        self.job.write_text(JOB.format(rounds=rounds, port=free_port(), tls=self.tls,
                                       patience=patience))
        self.config = load_config(self.job)
        task = load_task("digits", hidden=16)
        self.files = split_federation(make_dataset(resolve_config(self.config, task), task),
                                      root / "data")
        self.ids = [f.stem for f in self.files]
        for cid in self.ids:
            self.ca.enroll(cid, self.tls)

    def clients(self, **kw: Any) -> list[NodeClient]:
        return [node_client(self.config, cid, f, **kw)
                for cid, f in zip(self.ids, self.files, strict=True)]


class Runner:
    """Runs clients in threads and keeps what each ``run()`` returned or raised."""

    def __init__(self, clients: list[NodeClient]):
        self.clients = clients
        self.outcome: dict[str, Any] = {}
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True)
                        for c in clients]
        for t in self.threads:
            t.start()

    def _run(self, c: NodeClient) -> None:
        try:
            self.outcome[c.node.node_id] = c.run()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.outcome[c.node.node_id] = e

    def join(self, timeout: float = 30) -> dict[str, Any]:
        for t in self.threads:
            t.join(timeout)
        return self.outcome

    def stop(self) -> None:
        for c in self.clients:
            c.stop()
        self.join(10)


@contextmanager
def started(clients: list[NodeClient]) -> Iterator[Runner]:
    runner = Runner(clients)
    try:
        yield runner
    finally:
        runner.stop()


def _wait(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class _CrashAfter:
    """A callback whose ``after_round`` fails at ``round`` (after that round's checkpoint)."""

    def __init__(self, round: int):
        self.round = round

    def after_round(self, ctx: Any, report: Any) -> None:
        if report.round == self.round:
            raise RuntimeError("the coordinator's disk is full")


class _StopAfter:
    """A callback stopping the run deliberately after ``round`` (like a privacy budget)."""

    def __init__(self, round: int):
        self.round = round

    def after_round(self, ctx: Any, report: Any) -> str | None:
        return "privacy budget spent" if report.round == self.round else None


# -- defect 1: the truth the coordinator tells ------------------------------------------------


def test_a_crashed_coordinator_keeps_its_clients_for_the_resumed_one(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, rounds=4)
    run_dir = tmp_path / "run"
    with started(dep.clients()) as clients:
        with pytest.raises(RuntimeError, match="disk is full"):
            serve(dep.config, run_dir, callbacks=lambda p, r: [_CrashAfter(2)])
        # The clients were told to wait (RESTART), not that the run is finished.
        _wait(lambda: all(c.notices for c in clients.clients), "the RESTART notices")
        for c in clients.clients:
            assert c.notices == ["the coordinator stopped before the run was over (it failed: "
                                 "RuntimeError); its last checkpoint is kept, and `shoal serve "
                                 "--resume` continues the run"]
        assert clients.outcome == {}  # still running, reconnecting
        results = serve(load_config(run_dir / "config.toml"), run_dir, resume=True)
        outcome = clients.join()
    assert outcome == {cid: "the run is finished" for cid in dep.ids}
    (fed,) = results
    assert fed.rounds == 4
    assert [h["round/replied"] for h in fed.history] == [2.0] * 4  # no round ran without them
    assert all(c.sessions >= 2 for c in clients.clients)  # rejoined the resumed coordinator


def test_a_deliberate_stop_ends_the_run_for_the_clients(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, rounds=4)
    with started(dep.clients()) as clients:
        (fed,) = serve(dep.config, tmp_path / "run", callbacks=lambda p, r: [_StopAfter(1)])
        outcome = clients.join()
    assert fed.rounds == 1 and fed.stopped == "privacy budget spent"
    assert outcome == {cid: "the run is finished (federated stopped early: privacy budget "
                            "spent)" for cid in dep.ids}
    assert all(not c.notices for c in clients.clients)


def _slow(message: Message, context: NodeContext, next_handler: Handler) -> Message:
    time.sleep(0.2)  # rounds last long enough to stop the coordinator in the middle of the run
    return next_handler(message, context)


def test_sigterm_stops_shoal_serve_like_ctrl_c(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, rounds=30)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(var, None)
    nodes = dep.clients()
    for c in nodes:
        c.node.mods = (_slow,)
    with started(nodes) as clients:
        proc = subprocess.Popen([sys.executable, "-m", "shoal", "serve", str(dep.job), "--out",
                                 str(run_dir)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            ckpt = run_dir / "federated" / "checkpoints" / "round-000001" / "meta.json"
            _wait(lambda: ckpt.exists() or proc.poll() is not None, "round 1", 120)
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=60)[0].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 128 + signal.SIGTERM, out
        assert f"terminated (SIGTERM); completed rounds are checkpointed and the clients wait " \
               f"for the coordinator. Continue with:\n  shoal serve --resume {run_dir}" in out
        _wait(lambda: all(c.notices for c in clients.clients), "the RESTART notices")
        assert all("interrupted: Ctrl-C or SIGTERM" in c.notices[0] for c in clients.clients)
        assert clients.outcome == {}  # waiting for the resumed coordinator
    assert not (run_dir / "summary.json").exists()


def test_a_client_gives_up_after_its_patience(ca_dir: Path) -> None:
    coord = GrpcTransport("127.0.0.1:0", identity=coordinator_identity(ca_dir),
                          crl=ca_dir / "ca" / "crl.pem")
    client = NodeClient(coord.address, Node(NodeContext("client-0"), {}),
                        identity=node_identity(ca_dir, "client-0"), patience=1.0)
    with started([client]) as clients:
        assert coord.wait_for_nodes(1, 30)
        coord.close("maintenance", restart=True)
        clients.join(30)
        error = clients.outcome["client-0"]
    assert client.notices == ["maintenance"]
    assert isinstance(error, TransportError)
    assert str(error).startswith(f"node 'client-0': could not connect to the coordinator at "
                                 f"{coord.address} for ")
    assert str(error).endswith(
        f" s (network.patience_s = 1; UNAVAILABLE): nothing is listening at {coord.address} "
        "(connection refused); check network.address / --address and that `shoal serve` runs "
        "there.")


def test_a_round_waits_for_the_clients_it_needs(ca_dir: Path) -> None:
    with GrpcTransport("127.0.0.1:0", identity=coordinator_identity(ca_dir),
                       crl=ca_dir / "ca" / "crl.pem") as coord:
        wait = WaitForNodes(coord, count=2, wait_s=0.05)  # least=1
        waiter = threading.Thread(target=wait.before_round, args=(None, 3), daemon=True)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # wait_s passed, but a round with no client would fail
        client = NodeClient(coord.address, Node(NodeContext("client-0"), {}),
                            identity=node_identity(ca_dir, "client-0"))
        with running([client]):
            waiter.join(30)
            assert not waiter.is_alive()  # one client is what the round needs
            assert coord.nodes() == ["client-0"]


# -- defect 2: a client that says what is wrong -----------------------------------------------


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    path = tmp_path_factory.mktemp("data") / "site.npz"
    np.savez(path, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    return path


def _client_config(tls: Path, address: str, server_name: str = "") -> Config:
    return load_config(None, [f'network.tls_dir="{tls}"', f'network.address="{address}"',
                              f'network.server_name="{server_name}"', "network.patience_s=1",
                              "network.reconnect_max_s=0.2"])


def _tls_dir(path: Path, key_of: Path, ca_of: Path, node_id: str = "client-0") -> Path:
    path.mkdir()
    shutil.copy(key_of / f"{node_id}.key", path)
    shutil.copy(key_of / f"{node_id}.crt", path)
    shutil.copy(ca_of / "ca.crt", path)
    return path


def _join_error(config: Config, data: Path) -> str:
    started_at = time.monotonic()
    with pytest.raises(TransportError) as info:
        join(config, "client-0", data)
    assert time.monotonic() - started_at < 30  # it gave up (patience 1 s), it did not hang
    return str(info.value)


def test_join_explains_why_it_cannot_connect(ca_dir: Path, tmp_path: Path,
                                             data_file: Path) -> None:
    own = ca_dir / "nodes"
    other = CertificateAuthority.init(tmp_path / "other-ca", hosts=("localhost", "127.0.0.1"))
    other.enroll("client-0", tmp_path / "other-nodes")
    port = free_port()
    msg = _join_error(_client_config(own, f"127.0.0.1:{port}"), data_file)
    assert f"nothing is listening at 127.0.0.1:{port} (connection refused)" in msg

    with GrpcTransport("127.0.0.1:0", identity=coordinator_identity(ca_dir),
                       crl=ca_dir / "ca" / "crl.pem") as coord:
        msg = _join_error(_client_config(own, coord.address, "wrong.example.org"), data_file)
        assert msg.endswith(
            "TLS: the coordinator's certificate does not name 'wrong.example.org' (host-name "
            "mismatch); connect to a name given to `shoal ca init --host`, or set "
            "network.server_name to one of those names.")
        # This node's certificate from another CA: the coordinator refuses it in the handshake.
        foreign = _tls_dir(tmp_path / "foreign", tmp_path / "other-nodes", own)
        msg = _join_error(_client_config(foreign, coord.address), data_file)
        assert (f"the coordinator at {coord.address} closed the connection during the TLS "
                f"handshake: it probably refused this node's certificate "
                f"{foreign / 'client-0.crt'}") in msg
    # A coordinator whose certificate another CA issued (the wrong server, or the wrong ca.crt).
    with GrpcTransport("127.0.0.1:0", identity=Identity(
            tmp_path / "other-ca" / "coordinator.key", tmp_path / "other-ca" / "coordinator.crt",
            tmp_path / "other-ca" / "ca.crt")) as impostor:
        msg = _join_error(_client_config(own, impostor.address), data_file)
        assert msg.endswith(
            f"TLS: the certificate of the server at {impostor.address} was not issued by this "
            f"project's CA in {own / 'ca.crt'} (certificate verify failed); check that ca.crt "
            "is the project's CA certificate and that the address is the project's "
            "coordinator.")


def test_join_command_reports_in_one_line_and_exits_non_zero(ca_dir: Path, tmp_path: Path,
                                                              data_file: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    job = tmp_path / "job.toml"
    job.write_text("seed = 0\n")
    args = ["join", str(job), "--node-id", "client-0", "--data", str(data_file), "--address",
            address, "--set", f'network.tls_dir="{ca_dir / "nodes"}"', "--set",
            "network.patience_s=1.5", "--set", "network.reconnect_max_s=0.1"]
    runner = CliRunner()
    problem = f"nothing is listening at {address} (connection refused)"
    outputs = {}
    for flag in ("-q", None, "-v"):
        r = runner.invoke(app, [*args, *([flag] if flag else [])])
        assert r.exit_code == 1, r.output
        error = [line for line in r.output.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and problem in error[0], r.output
        assert "could not connect to the coordinator" in error[0]
        outputs[flag] = [line for line in r.output.splitlines() if "Retrying" in line]
    assert outputs["-q"] == []
    assert len(outputs[None]) == 1 and "WARNING" in outputs[None][0]  # a problem, said once
    assert len(outputs["-v"]) >= 2  # -v: every retry
    assert problem in outputs[None][0]


def test_serve_command_shows_progress(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, rounds=2)
    with started(dep.clients()) as clients:
        r = CliRunner().invoke(app, ["serve", str(dep.job), "--out", str(tmp_path / "run")])
        outcome = clients.join()
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any("INFO shoal.net.deploy: coordinator listening on 127.0.0.1:" in x for x in lines)
    for rnd in (1, 2):
        (line,) = [x for x in lines if x.startswith(f"round {rnd}/2: ")]
        assert "2/2 replied" in line and "accuracy " in line, line
    assert any("INFO shoal.net.coordinator: node client-0 connected" in line for line in lines)  # INFO of shoal.net
    assert outcome == {cid: "the run is finished" for cid in dep.ids}
    quiet = CliRunner().invoke(app, ["serve", "--resume", str(tmp_path / "run"), "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert not [x for x in quiet.output.splitlines() if x.startswith("round ")]


def test_serve_resume_of_a_missing_directory_says_it_is_no_run_directory(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["serve", "--resume", str(tmp_path / "nope"), "--insecure"])
    assert res.exit_code != 0
    assert str(res.exception).startswith(f"resume: the run directory {tmp_path / 'nope'} does "
                                         "not exist; pass the directory a run wrote")


def test_serve_refuses_a_used_run_directory_and_offers_overwrite(tmp_path: Path) -> None:
    used = tmp_path / "run"
    used.mkdir()
    (used / "config.toml").write_text("seed = 0\n")
    res = CliRunner().invoke(app, ["serve", "--out", str(used), "--insecure"])
    assert res.exit_code != 0 and "--overwrite" in str(res.exception)
    res = CliRunner().invoke(app, ["serve", "--resume", str(used), "--overwrite", "--insecure"])
    assert res.exit_code != 0
