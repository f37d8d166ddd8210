"""`shoal serve` / `shoal join` end to end: resume after a coordinator crash, the CA commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from shoal.cli import app
from shoal.config import load_config
from shoal.data.tasks import load_task
from shoal.errors import ConfigError
from shoal.experiment import make_dataset, resolve_config, run_experiment
from shoal.message import Message
from shoal.net import CertificateAuthority
from shoal.net.clientdata import load_client_data, split_federation
from shoal.net.deploy import coordinator_config, node_client, refuse_simulation_only
from shoal.node import Handler, NodeContext

from ._helpers import JOB, free_port, running


def _slow(message: Message, context: NodeContext, next_handler: Handler) -> Message:
    time.sleep(0.3)  # rounds last long enough to kill the coordinator in the middle of the run
    return next_handler(message, context)


def _serve(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-m", "shoal", "serve", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_coordinator_killed_and_resumed_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    tls = tmp_path / "ca"
    ca = CertificateAuthority.init(tls)
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(rounds=6, port=free_port(), tls=tls))
    config = load_config(job)
    task = load_task("digits", hidden=16)
    files = split_federation(make_dataset(resolve_config(config, task), task), tmp_path / "data")
    ids = [f.stem for f in files]
    clients = []
    for cid, f in zip(ids, files, strict=True):
        ca.enroll(cid, tls)
        c = node_client(config, cid, f)
        c.node.mods = (_slow,)
        clients.append(c)
    run_dir = tmp_path / "run"
    with running(clients):
        first = _serve([str(job), "--out", str(run_dir)], tmp_path)
        ckpt = run_dir / "federated" / "checkpoints" / "round-000002" / "meta.json"
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert first.poll() is None, first.communicate()[0].decode()
            assert time.monotonic() < deadline, "round 2 never completed"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert not (run_dir / "summary.json").exists()
        resumed = _serve(["--resume", str(run_dir)], tmp_path)
        out, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, out.decode()
    served = load_file(str(run_dir / "federated" / "model.safetensors"))
    run_experiment(load_config(job, ["baseline=false"]), tmp_path / "sim")
    simulated = load_file(str(tmp_path / "sim" / "federated" / "model.safetensors"))
    assert served.keys() == simulated.keys()
    for k in served:
        assert torch.equal(served[k], simulated[k]), k
    assert all(c.sessions >= 2 for c in clients)  # every client rejoined the new coordinator


def test_ca_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    ca = tmp_path / "ca"
    r = runner.invoke(app, ["ca", "init", "--dir", str(ca), "--host", "coord.example.org"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["ca", "enroll", "site-a", "--dir", str(ca), "--out",
                            str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"site-a.key", "site-a.crt", "ca.crt"}
    r = runner.invoke(app, ["ca", "revoke", "site-a", "--dir", str(ca)])
    assert r.exit_code == 0, r.output
    assert len(CertificateAuthority(ca).revoked()) == 1
    with pytest.raises(ConfigError) as info:
        CertificateAuthority(ca).revoke("site-b")
    assert str(info.value) == (f"CA: no certificate was issued to 'site-b' by the CA in "
                               f"{str(ca)!r}; nothing to revoke.")
    with pytest.raises(ConfigError) as info:
        CertificateAuthority.init(ca)
    assert str(info.value) == (f"CA: {str(ca)!r} already holds a CA (ca.key); refusing to "
                               "overwrite it. Use another directory.")
    with pytest.raises(ConfigError, match="node id 'a b' is not allowed"):
        CertificateAuthority(ca).enroll("a b", tmp_path)


def test_client_data_files(tmp_path: Path) -> None:
    import numpy as np

    np.savez(tmp_path / "ok.npz", x=np.ones((4, 2), np.float32), y=np.arange(4))
    data = load_client_data(tmp_path / "ok.npz")
    assert len(data.train) == 4 and data.eval is None
    np.savez(tmp_path / "bad.npz", features=np.ones(3))
    from shoal.errors import DataError
    with pytest.raises(DataError) as info:
        load_client_data(tmp_path / "bad.npz")
    assert str(info.value) == (f"client data file {str(tmp_path / 'bad.npz')!r} has no array "
                               "x, y; expected x and y (and optionally x_eval, y_eval), got "
                               "features.")


def test_a_deployment_refuses_dp_noise_from_the_shared_seed() -> None:
    user_dp = load_config(None, ["privacy.mode=user", "federated.weighting=uniform",
                                 "privacy.noise_multiplier=1.0"])
    served = coordinator_config(user_dp)
    assert not served.privacy.reproducible and not served.baseline  # secret noise, the default
    seeded = load_config(None, ["privacy.mode=user", "federated.weighting=uniform",
                                "privacy.noise_multiplier=1.0", "privacy.reproducible=true"])
    for command in ("serve", "join"):
        with pytest.raises(ConfigError) as info:
            refuse_simulation_only(seeded, command)
        assert str(info.value) == (
            f"config field 'privacy.reproducible': {command} runs a deployment, whose DP noise "
            "must stay secret from the coordinator and the other participants, but "
            "reproducible = true draws it from the run's seed, which every participant holds; "
            "set privacy.reproducible = false.")


def test_a_deployment_refuses_simulated_attackers() -> None:
    # [attack] simulates malicious participants; a deployed node with it would be one.
    attacked = load_config(None, ["attack.kind=sign_flip"])
    for command in ("serve", "join", "swarm join"):
        with pytest.raises(ConfigError, match=f"config field 'attack.kind': {command} runs a "
                           "deployment, but attack.kind = \"sign_flip\" simulates malicious"):
            refuse_simulation_only(attacked, command)
    with pytest.raises(ConfigError, match="config field 'attack.kind'"):
        coordinator_config(attacked)


def test_a_deployment_refuses_planted_canaries() -> None:
    planted = load_config(None, ["audit.canaries=10"])
    for command in ("serve", "join", "swarm join"):
        with pytest.raises(ConfigError, match=f"config field 'audit.canaries': {command} runs "
                           "a deployment, where each client holds its own data"):
            refuse_simulation_only(planted, command)
