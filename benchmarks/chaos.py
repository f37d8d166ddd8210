"""Chaos: a deployment on loopback with mutual TLS that loses clients and its coordinator and
faces hostile peers — and still completes every round, keeps every honest client, and learns
what the same job learns without faults.

Job: Fashion-MNIST (the MLP), 50 clients (Dirichlet α = 1), 10 sampled per round, 30 rounds,
1 local epoch of batch 32, coordinator-side norm clipping at 1.0 (the same in both variants).
Real processes: the coordinator is ``shoal serve`` (and ``shoal serve --resume``); the 50
honest clients are real ``NodeClient``s, each with its own enrolled certificate, 10 in each of
5 host processes (to fit 2 cores; a host shares one model replica among its nodes). Faults:

* after round 3: 2,000 TCP connections that never start a TLS handshake are opened and held;
* after round 4: one host is killed (SIGKILL: 10 clients, 20 %) and restarted 5 s later;
* after round 10 the coordinator gets SIGINT, after round 20 SIGKILL; each time ``serve --resume``
  restarts it and the clients, told to wait (SIGINT) or finding it gone (SIGKILL), reconnect;
* all run long: 2 malicious enrolled clients (their own host process) answer every train
  request with an update of 0.5 everywhere and weight 1e30, and one of them holds 300
  streams that never say HELLO.

The baseline is the same job with no faults and no attackers, in simulation
(``run_experiment``; simulation and deployment are bit-identical without faults).

Figures: ``rounds_completed`` (rounds applied exactly once in the final metrics),
``rounds_lost`` (rounds missing or failed), ``clients_lost`` (honest clients whose last host
did not end with the coordinator's "finished"), ``accuracy_gap_points`` (100 x (baseline -
chaos) central accuracy after the last round), ``coordinator_crashes`` (coordinator exits
that were not the benchmark's own signals).

    python benchmarks/chaos.py [--clients 50] [--rounds 30]

(other sizes scale the schedule: idle connections after round max(1, R // 10), the host kill
one round later, SIGINT after R // 3, SIGKILL after 2 R // 3.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import final_line, machine  # noqa: E402

HOSTS = 5
MALICIOUS = ("mal-0", "mal-1")


def overrides(clients: int, rounds: int) -> list[str]:
    """The job, as ``--set`` overrides of the built-in default config."""
    return ["seed=0", "task.name=fashion_mnist", "task.model=mlp", "data.partition=dirichlet",
            "data.alpha=1.0", f"data.num_clients={clients}", "data.eval_fraction=0",
            f"federated.rounds={rounds}", "federated.clients_per_round=10",
            "federated.min_replies=8", "federated.timeout_s=60", "federated.clip_norm=1.0",
            "federated.clip_at=coordinator", "client.epochs=1", "client.batch_size=32",
            "checkpoint.every=1", "baseline=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from shoal.config import load_config
    from shoal.data.tasks import load_task
    from shoal.experiment import build_federated, initial_params, make_dataset, resolve_config

    config = load_config(None, overrides(args.clients, args.rounds))
    task = load_task(config.task.name, **config.task.options)
    config = resolve_config(config, task)
    model, _ = initial_params(config, task)
    dataset = make_dataset(config, task)
    algorithm, _ = build_federated(config, task, dataset, model)
    return config, dataset, algorithm


def host(args: argparse.Namespace) -> None:
    """A host process: run nodes ``--ids`` until the coordinator says the run finished;
    ``--malicious``: they poison (0.5 everywhere, weight 1e30) and hold idle streams."""
    import grpc
    import torch

    from shoal.message import Message
    from shoal.net import Backoff, Identity, NodeClient
    from shoal.net.coordinator import METHOD
    from shoal.node import Node, NodeContext

    torch.set_num_threads(1)
    _, dataset, algorithm = _build(args)
    handlers = dict(algorithm.handlers())
    if args.malicious:
        honest = handlers["train"]

        def poison(message: Message, context: NodeContext) -> Message:
            reply = honest(message, context)
            bad = {k: torch.full_like(v, 0.5) for k, v in reply.tensors.items()}
            return message.reply(tensors=bad, config={**reply.config, "weight": 1e30},
                                 metrics={"round/replied": 1000.0, "train/examples": 1e12})
        handlers["train"] = poison
    tls = Path(args.tls)
    lock = threading.Lock()  # the nodes of this process share one model replica
    clients, ids = [], args.ids.split(",")
    for cid in ids:
        data = dataset.client(dataset.client_ids()[0] if args.malicious else cid)
        ident = Identity(tls / f"{cid}.key", tls / f"{cid}.crt", tls / "ca.crt")
        clients.append(NodeClient(args.address, Node(NodeContext(cid, data), handlers),
                                  lock=lock, identity=ident, backoff=Backoff(0.2, 2.0),
                                  patience=args.patience))
    if args.malicious:  # 300 streams that never say HELLO, kept open (and reopened)
        ident = Identity(tls / f"{ids[0]}.key", tls / f"{ids[0]}.crt", tls / "ca.crt")
        key, cert, ca = ident.read()
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        never = threading.Event()

        def silent():  # type: ignore[no-untyped-def]
            never.wait()
            yield b""

        def hold() -> None:
            while True:
                with grpc.secure_channel(args.address, creds) as channel:
                    calls = [channel.stream_stream(METHOD)(silent()) for _ in range(300)]
                    for c in calls:
                        try:
                            for _ in c:
                                pass
                        except grpc.RpcError:
                            pass
                time.sleep(1.0)
        threading.Thread(target=hold, daemon=True).start()
    results: list[str] = []

    def serve_one(c: NodeClient) -> None:
        try:
            results.append(c.run())
        except Exception as e:  # noqa: BLE001 - the exit code says it
            print(f"{c.node.node_id}: {e}", file=sys.stderr, flush=True)
            results.append("error")
    threads = [threading.Thread(target=serve_one, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    finished = sum("finished" in r for r in results)
    print(json.dumps({"finished": finished, "results": results}), flush=True)
    sys.exit(0 if finished == len(clients) else 1)


class Rounds:
    """The rounds a run directory's metrics record (each once, after a resume)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "federated" / "metrics.jsonl"

    def history(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
        return out

    def done(self) -> int:
        h = self.history()
        return int(h[-1]["round"]) if h else 0

    def wait_for(self, r: int, coordinator: subprocess.Popen, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while self.done() < r:
            if coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited ({coordinator.returncode}) "
                                   f"before round {r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"round {r} did not finish within {timeout:g} s")
            time.sleep(0.05)


def chaos(args: argparse.Namespace) -> dict:
    from shoal.net import CertificateAuthority

    tmp = Path(tempfile.mkdtemp(prefix="shoal-chaos-"))
    ca_dir, certs, run_dir = tmp / "ca", tmp / "certs", tmp / "run"
    ca = CertificateAuthority.init(ca_dir, hosts=("127.0.0.1", "localhost"))
    ids = list(_build(args)[1].client_ids())
    for cid in (*ids, *MALICIOUS):
        ca.enroll(cid, certs)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    net = [f'network.address="{address}"', f'network.tls_dir="{ca_dir}"',
           "network.min_nodes=10", "network.wait_s=120", "network.late_grace_s=20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("REQUESTS_CA_BUNDLE", None)
    env.pop("CURL_CA_BUNDLE", None)
    sets = [x for o in (*overrides(args.clients, args.rounds), *net) for x in ("--set", o)]
    log = open(tmp / "coordinator.log", "ab")  # noqa: SIM115

    def coordinator(resume: bool) -> subprocess.Popen:
        cmd = ([sys.executable, "-m", "shoal", "serve", "--resume", str(run_dir)] if resume
               else [sys.executable, "-m", "shoal", "serve", "--out", str(run_dir)])
        return subprocess.Popen([*cmd, *sets, "-q"], env=env, stdout=log, stderr=log)

    groups = [ids[i::HOSTS] for i in range(HOSTS)]

    def start_host(group: list[str], malicious: bool = False) -> subprocess.Popen:
        cmd = [sys.executable, __file__, "--variant", "host", "--ids", ",".join(group),
               "--address", address, "--tls", str(certs), "--clients", str(args.clients),
               "--rounds", str(args.rounds), "--patience", str(args.patience)]
        return subprocess.Popen([*cmd, *(["--malicious"] if malicious else [])], env=env,
                                stdout=subprocess.PIPE, stderr=log)

    crashes = 0
    coord = coordinator(resume=False)
    hosts = [start_host(g) for g in groups]
    bad = start_host(list(MALICIOUS), malicious=True)
    rounds = Rounds(run_dir)
    idle: list[socket.socket] = []
    idle_round = max(1, args.rounds // 10)
    try:
        rounds.wait_for(idle_round, coord)
        for _ in range(2000):  # connections that never start a TLS handshake
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            idle.append(s)
        rounds.wait_for(idle_round + 1, coord)
        hosts[0].send_signal(signal.SIGKILL)
        hosts[0].wait()
        time.sleep(5)
        hosts[0] = start_host(groups[0])
        for r, sig in ((args.rounds // 3, signal.SIGINT), (2 * args.rounds // 3, signal.SIGKILL)):
            rounds.wait_for(r, coord)
            if coord.poll() is not None:
                raise RuntimeError(f"the run ended ({coord.returncode}) before the fault after "
                                   f"round {r} could hit it: rounds are too short")
            coord.send_signal(sig)
            code = coord.wait(120)
            expected = (130, -signal.SIGINT) if sig == signal.SIGINT else (-signal.SIGKILL,)
            crashes += code not in expected
            coord = coordinator(resume=True)
        code = coord.wait(1800)
        crashes += code != 0
    finally:
        for s in idle:
            s.close()
        if coord.poll() is None:
            coord.kill()
    honest_finished = 0
    for p in hosts:
        try:
            out, _ = p.communicate(timeout=120)
            last = out.decode().strip().splitlines()[-1] if out.strip() else "{}"
            honest_finished += json.loads(last).get("finished", 0)
        except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
            p.kill()
    bad.kill()
    h = rounds.history()
    applied = {int(x["round"]) for x in h if "round/failed" not in x}
    counts = [int(x["round"]) for x in h]
    return {"rounds_completed": len(applied) if len(counts) == len(set(counts)) else -1,
            "rounds_lost": args.rounds - len(applied),
            "clients_lost": args.clients - honest_finished,
            "accuracy": h[-1].get("central/accuracy", float("nan")) if h else float("nan"),
            "coordinator_crashes": crashes,
            "weights_capped": sum(x.get("round/weights_capped", 0.0) for x in h),
            "retries": sum(x.get("round/retries", 0.0) for x in h),
            "dir": str(tmp)}


def baseline(args: argparse.Namespace) -> float:
    """Central accuracy of the same job with no faults and no attackers (simulation)."""
    from shoal.config import load_config
    from shoal.experiment import run_experiment

    config = load_config(None, overrides(args.clients, args.rounds))
    out = Path(tempfile.mkdtemp(prefix="shoal-chaos-base-")) / "run"
    (result,) = run_experiment(config, out)
    return float(result.history[-1]["central/accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["host"])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--patience", type=float, default=600.0)
    ap.add_argument("--ids")
    ap.add_argument("--address")
    ap.add_argument("--tls")
    ap.add_argument("--malicious", action="store_true")
    args = ap.parse_args()
    if args.variant == "host":
        host(args)
        return
    print(f"chaos: {machine()}", flush=True)
    base = baseline(args)
    print(f"  baseline (no faults, simulation): accuracy {base:.4f}", flush=True)
    out = chaos(args)
    print(f"  chaos: {out}", flush=True)
    final_line(rounds_completed=out["rounds_completed"], rounds_lost=out["rounds_lost"],
               clients_lost=out["clients_lost"],
               accuracy_gap_points=round(100 * (base - out["accuracy"]), 2),
               coordinator_crashes=out["coordinator_crashes"])


if __name__ == "__main__":
    main()
