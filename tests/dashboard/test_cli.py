"""`shoal run --dashboard` and `shoal serve --dashboard` as a user runs them: the URL is
printed, the page follows the run, and it closes with the command."""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shoal.config import load_config
from shoal.data.tasks import load_task
from shoal.experiment import make_dataset, resolve_config
from shoal.net import CertificateAuthority
from shoal.net.clientdata import split_federation
from shoal.net.deploy import node_client

from ..net._helpers import JOB, free_port, running
from ._sse import events

SRC = str(Path(__file__).parents[2] / "src")


def _shoal(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-m", "shoal", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _url(proc: subprocess.Popen[str], lines: list[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"dashboard: (https?://127\.0\.0\.1:\d+/)", line)
        if found:
            return found.group(1)
    raise AssertionError("no dashboard URL printed:\n" + "".join(lines))


def _follow(url: str, **client) -> list[dict]:
    """Every snapshot the event stream sends until the dashboard closes."""
    seen = []
    with httpx.Client(base_url=url, timeout=120, trust_env=False, **client) as http:
        with http.stream("GET", "/events") as stream:
            for name, data in events(stream):
                if name == "end":
                    break
                seen.append(data)
    return seen


def _closed(url: str) -> bool:
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_run_dashboard_follows_the_run_and_closes_with_it(tmp_path) -> None:
    proc = _shoal(["run", "-q", "--dashboard", "--dashboard-port", "0", "--out",
                   str(tmp_path / "run"), "--set", "federated.rounds=4", "--set",
                   "client.epochs=1", "--set", "federated.clients_per_round=5"], tmp_path)
    lines: list[str] = []
    try:
        url = _url(proc, lines)
        assert "(read-only; this machine only)" in lines[-1]
        seen = _follow(url)
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    versions = [s["version"] for s in seen]
    assert versions == sorted(set(versions))
    # Both paradigms of `shoal run` (the job, then its centralized baseline), each to the end.
    last = seen[-1]
    assert last["run"]["paradigm"] == "centralized" and last["run"]["status"] == "finished"
    assert last["finished"][0]["label"] == "federated" and last["finished"][0]["rounds"] == 4
    assert any(s["run"]["paradigm"] == "federated" for s in seen)  # followed as it ran
    assert [r["round"] for r in last["rounds"]] == [1, 2, 3, 4]
    assert _closed(url)





@pytest.mark.timeout(240)
def test_serve_dashboard_shows_the_clients_joining_over_mutual_tls(tmp_path) -> None:
    tls = tmp_path / "ca"
    ca = CertificateAuthority.init(tls)
    viewer = ca.enroll("viewer", tmp_path / "viewer", viewer=True)
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(rounds=3, port=free_port(), tls=tls))
    config = load_config(job)
    task = load_task("digits", hidden=16)
    files = split_federation(make_dataset(resolve_config(config, task), task), tmp_path / "data")
    clients, client_certs = [], []
    for f in files:
        client_certs.append(ca.enroll(f.stem, tls))
        clients.append(node_client(config, f.stem, f))
    verify = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    verify.load_cert_chain(str(viewer.cert), str(viewer.key))
    proc = _shoal(["serve", str(job), "--out", str(tmp_path / "run"), "--dashboard",
                   "--dashboard-port", "0"], tmp_path)
    lines: list[str] = []
    try:
        url = _url(proc, lines)
        assert url.startswith("https://") and "mutual TLS" in lines[-1]
        # Without a certificate from the project's CA there is no page.
        with pytest.raises(httpx.TransportError):
            httpx.get(url, verify=ssl.create_default_context(cafile=str(tls / "ca.crt")),
                      trust_env=False, timeout=10)
        # Attack: a training client opens it with its own certificate, to see the others.
        as_client = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        as_client.load_cert_chain(str(client_certs[0].cert), str(client_certs[0].key))
        refused = httpx.get(url + "state", verify=as_client, trust_env=False, timeout=10)
        assert refused.status_code == 403
        assert f"the certificate {files[0].stem!r} is not a dashboard viewer's" in refused.text
        assert "`shoal ca enroll NAME --viewer`" in refused.text
        with running(clients):
            seen = _follow(url, verify=verify)
            out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    last = seen[-1]
    assert last["run"]["status"] == "finished" and last["run"]["done"] == 3
    assert [r["round"] for r in last["rounds"]] == [1, 2, 3]
    assert all(r["metrics"]["round/replied"] == 3 for r in last["rounds"])
    # The connected clients, as the coordinator saw them.
    ids = sorted(f.stem for f in files)
    assert max(s["nodes"]["connected"] for s in seen) == 3
    assert sorted(n["id"] for n in last["nodes"]["list"]) == ids
    assert _closed(url)
