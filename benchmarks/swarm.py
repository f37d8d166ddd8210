"""Swarm learning: accuracy beside FedAvg, and what a round without an aggregator costs.

1. Simulation (one process, in-process ledger): the heart task's 4 hospitals as peers (40
   rounds) and digits with 10 peers (20 rounds), swarm with mean merging vs FedAvg with the
   same clients and seed; the final central test accuracy of each (targets: within 0.5 points).
2. Deployment on loopback: 10 peers as separate processes (``shoal swarm join``) against a
   3-member etcd cluster over mutual TLS, vs the same job's FedAvg over the deployment's gRPC
   transport (a coordinator and 10 ``shoal join`` processes with the same certificates), every
   process on one thread. A swarm round lasts from the moment the last peer finished the
   previous round to the moment the last peer finishes this one (train, publish, close, fetch 9
   blobs, verify, merge, record); a FedAvg round is the coordinator's ``time/round_s``. Rounds
   are paired by number (round 1 is left out: processes warm up); a ratio is the median of the
   per-round ratios. Two jobs: ``round_overhead_ratio`` on a round of real local work
   (Fashion-MNIST MLP, one local epoch of 6,000 images per peer; target <= 2), and ``tiny_round_overhead_ratio``
   with ``swarm_overhead_s`` on a round of almost none (digits, 4 steps), where coordination is
   all there is. Swarm and FedAvg run one after the other on this shared machine.
3. ``ledger_appends_per_s``: signed entries appended one after another by one device to the
   3-member cluster (each a write-once etcd transaction, replicated by Raft before it returns).

    python benchmarks/swarm.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import final_line, machine  # noqa: E402

_TLS_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")


def simulated(task: str, peers: int, rounds: int) -> dict[str, float]:
    """Final central accuracy of swarm and FedAvg on ``task`` (simulation)."""
    import shoal

    out: dict[str, float] = {}
    for paradigm in ("swarm", "federated"):
        config = shoal.load_config(None, [
            f"task.name={task}", f"paradigm={paradigm}", "baseline=false",
            f"federated.rounds={rounds}", f"federated.clients_per_round={peers}",
            *([f"data.num_clients={peers}"] if task == "digits" else [])])
        with tempfile.TemporaryDirectory() as d:
            (r,) = shoal.run_experiment(config, d)
        out[paradigm] = r.final["accuracy"]
    return out


JOBS = {
    # A round of real local work: Fashion-MNIST's MLP, 10 peers of 6,000 images, one local
    # epoch (FedAvg's usual E = 1: 188 steps of 32).
    "fashion_mnist": ('name = "fashion_mnist"\nmodel = "mlp"', "epochs = 1"),
    # A round of almost nothing (4 steps on digits): what coordination alone costs.
    "digits": ('name = "digits"', "max_steps = 4"),
}


def _job(root: Path, endpoints: list[str], peers: int, rounds: int, job: str) -> Path:
    task, client = JOBS[job]
    path = root / f"{job}.toml"
    path.write_text(f"""
paradigm = "swarm"
baseline = false
[task]
{task}
[data]
num_clients = {peers}
eval_fraction = 0
[federated]
rounds = {rounds}
clients_per_round = {peers}
[client]
{client}
[network]
tls_dir = "{root / 'devices'}"
[swarm]
job = "{job}"
endpoints = {json.dumps(endpoints)}
identity_dir = "{root / 'devices'}"
close_timeout_s = 30
""")
    return path


def _rounds(root: Path, job: Path, ids: list[str], ca_dir: Path, rounds: int,
            peers: int) -> tuple[dict[int, float], dict[int, float]]:
    """Round times of ``job`` as a swarm (peer processes) and as FedAvg (a coordinator here,
    ``shoal join`` processes with the same certificates)."""
    import shoal
    from shoal.experiment import build_federated, initial_params, make_dataset, resolve_config
    from shoal.net import GrpcTransport, Identity
    from shoal.net.clientdata import split_federation
    from shoal.net.deploy import WaitForNodes
    from shoal.run import run

    config = shoal.load_config(job)
    task = shoal.load_task(config.task.name, **config.task.options)
    config = resolve_config(config, task)
    data = root / "data" / job.stem
    split_federation(make_dataset(config, task), data)
    # Every process on one thread: 10 processes share this machine's cores (both sides alike).
    env = {k: v for k, v in os.environ.items() if k not in _TLS_ENV}
    env["OMP_NUM_THREADS"] = "1"
    out = root / "swarm" / job.stem
    procs = [subprocess.Popen(
        [sys.executable, "-m", "shoal", "swarm", "join", str(job), "--node-id", d,
         "--data", str(data / f"{d}.npz"), "--out", str(out / d), "-q"], env=env)
        for d in ids]
    for p in procs:
        p.wait(1800)
    if any(p.returncode for p in procs):
        raise SystemExit("a swarm peer failed")
    ends: dict[int, list[float]] = {}
    for d in ids:
        for line in (out / d / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            ends.setdefault(row["round"], []).append(row["time/end"])
    swarm_round = {r: max(ends[r]) - max(ends[r - 1]) for r in range(2, rounds + 1)}

    fed = resolve_config(shoal.load_config(job, ["paradigm=federated"]), task)
    model, params0 = initial_params(fed, task)
    algorithm, _ = build_federated(fed, task, make_dataset(fed, task), model)
    coord = GrpcTransport("127.0.0.1:0", crl=ca_dir / "crl.pem",
                          identity=Identity(ca_dir / "coordinator.key",
                                            ca_dir / "coordinator.crt", ca_dir / "ca.crt"))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "shoal", "join", str(job), "--node-id", d,
         "--data", str(data / f"{d}.npz"), "--set", "paradigm=federated",
         "--address", coord.address, "-q"], env=env) for d in ids]
    res = run(algorithm, coord, rounds=rounds, params=params0,
              callbacks=[WaitForNodes(coord, peers, 300)])
    coord.close()
    for p in procs:
        p.wait(120)
    fed_round = {h["round"]: h["time/round_s"] for h in res.history}
    return swarm_round, {r: fed_round[r] for r in range(2, rounds + 1)}


def deployed(peers: int, rounds: int, appends: int) -> dict[str, float]:
    """Swarm vs FedAvg rounds on loopback (both jobs), and ledger appends per second."""
    from shoal.ledger.cluster import EtcdCluster
    from shoal.ledger.enroll import Registrar, SwarmIdentity
    from shoal.ledger.entry import Entry
    from shoal.ledger.ledger import Ledger
    from shoal.net import CertificateAuthority

    for var in _TLS_ENV:
        os.environ.pop(var, None)
    root = Path(tempfile.mkdtemp(prefix="shoal-swarm-bench-"))
    ca = CertificateAuthority.init(root / "ca")
    ids = [f"client-{i}" for i in range(peers)]
    out: dict[str, float] = {}
    try:
        with EtcdCluster(root / "ledger", ca) as cluster:
            registrar = Registrar(cluster.store(), ca)
            for d in ids:
                registrar.enroll(d, root / "devices")
            shutil.copyfile(ca.dir / "crl.pem", root / "devices" / "crl.pem")
            for name in JOBS:
                job = _job(root, cluster.endpoints, peers, rounds, name)
                swarm_round, fed_round = _rounds(root, job, ids, ca.dir, rounds, peers)
                ratios = [swarm_round[r] / fed_round[r] for r in swarm_round]
                out[f"{name}_swarm_round_s"] = statistics.median(swarm_round.values())
                out[f"{name}_fedavg_round_s"] = statistics.median(fed_round.values())
                out[f"{name}_ratio"] = statistics.median(ratios)
                out[f"{name}_overhead_s"] = statistics.median(
                    swarm_round[r] - fed_round[r] for r in swarm_round)
                print(f"loopback, 10 peers, {name}: swarm round {out[f'{name}_swarm_round_s']:.3f}"
                      f" s, FedAvg round {out[f'{name}_fedavg_round_s']:.3f} s (medians); paired "
                      f"ratio {out[f'{name}_ratio']:.3f}, swarm - FedAvg "
                      f"{out[f'{name}_overhead_s']:.3f} s", flush=True)
            # -- ledger appends: one device, one after another
            ident = SwarmIdentity.load(root / "devices", ids[0])
            with cluster.store(ident.tls) as store:
                ledger, signer = Ledger(store), ident.signer()
                t0 = time.perf_counter()
                for r in range(1, appends + 1):
                    ledger.append(Entry("appends", r, ids[0], "update", 0, blob="0" * 64,
                                        base="0" * 64, examples=1.0), signer)
                out["ledger_appends_per_s"] = appends / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and appends")
    args = ap.parse_args()
    print(machine(), flush=True)
    heart = simulated("heart", 4, 10 if args.quick else 40)
    print(f"heart, 4 peers: swarm {heart['swarm']:.4f}, FedAvg {heart['federated']:.4f}",
          flush=True)
    digits = simulated("digits", 10, 5 if args.quick else 20)
    print(f"digits, 10 peers: swarm {digits['swarm']:.4f}, FedAvg {digits['federated']:.4f}",
          flush=True)
    dep = deployed(10, 6 if args.quick else 15, 50 if args.quick else 300)
    print(f"ledger: {dep['ledger_appends_per_s']:.0f} signed appends/s (one device, 3 members)",
          flush=True)
    final_line(swarm_accuracy=digits["swarm"], fedavg_accuracy=digits["federated"],
               heart_swarm_accuracy=heart["swarm"], heart_fedavg_accuracy=heart["federated"],
               round_overhead_ratio=dep["fashion_mnist_ratio"],
               ledger_appends_per_s=dep["ledger_appends_per_s"],
               tiny_round_overhead_ratio=dep["digits_ratio"],
               swarm_overhead_s=dep["digits_overhead_s"])


if __name__ == "__main__":
    main()
