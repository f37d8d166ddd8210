"""Load on the deployed transport: one coordinator, 100 client nodes over gRPC with mutual TLS.

Workload (issue "real deployment"): digits (MLP, 16 hidden units), 100 IID clients all sampled
every round, 1 local epoch capped at 2 steps of batch 16, 20 rounds, per-round timeout 60 s,
min_replies 50. The clients run as real ``NodeClient``s, each with its own enrolled certificate,
20 nodes in each of 5 host processes (to fit 2 cores). During rounds 3, 7, 11, 15 and 19 one
host process is killed (SIGKILL, 20 % of the clients) while the round runs (once a tenth of
the round's replies arrived), and restarted at once; its nodes rejoin with exponential backoff and the coordinator waits for them before the
next round.

* ``network``: the coordinator (this child) runs FedAvg over ``GrpcTransport`` on loopback.
* ``sim``: the same job in simulation (``InProcessTransport``).

Figures: ``rounds_completed`` (rounds whose update was applied), ``rounds_lost`` (rounds that
failed or did not run), ``network_overhead_ratio`` (median round time over gRPC / in
simulation), ``bytes_per_client_round`` (wire frame bytes both ways per sampled client and
round, before TLS and HTTP/2 framing). The network variant trains its clients in 5 processes
at once while the simulation runs them one after the other in one process, so on a machine with
free cores the ratio can fall below 1: it compares the two ways a round is actually run.

    python benchmarks/network_load.py [--quick] [--reps 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, emit, final_line, machine, median  # noqa: E402

HOSTS = 5


def _overrides(nodes: int, rounds: int) -> list[str]:
    return ["seed=0", "task.name=digits", "task.hidden=16", "data.partition=iid",
            f"data.num_clients={nodes}", "data.eval_fraction=0", f"federated.rounds={rounds}",
            "federated.clients_per_round=1.0", f"federated.min_replies={nodes // 2}",
            "federated.timeout_s=60", "client.epochs=1", "client.max_steps=2",
            "client.batch_size=16", "baseline=false"]


def _build(nodes: int, rounds: int):  # type: ignore[no-untyped-def]
    from shoal.config import load_config
    from shoal.data.tasks import load_task
    from shoal.experiment import build_federated, initial_params, make_dataset, resolve_config

    config = load_config(None, _overrides(nodes, rounds))
    task = load_task("digits", hidden=16)
    config = resolve_config(config, task)
    model, params0 = initial_params(config, task)
    dataset = make_dataset(config, task)
    algorithm, sim = build_federated(config, task, dataset, model)
    return config, dataset, algorithm, sim, params0


def sim_variant(nodes: int, rounds: int) -> dict:
    import torch

    from shoal.run import run

    torch.set_num_threads(1)
    _, _, algorithm, sim, params0 = _build(nodes, rounds)
    res = run(algorithm, sim, rounds=rounds, params=params0)
    times = [h["time/round_s"] for h in res.history]
    return {"round_s": statistics.median(times), "rounds": len(times)}


def host_variant(args: argparse.Namespace) -> None:
    """A host process: run nodes ``--ids`` (comma separated) until the coordinator says BYE."""
    import torch

    from shoal.net import Backoff, Identity, NodeClient
    from shoal.node import Node, NodeContext

    torch.set_num_threads(1)
    _, dataset, algorithm, _, _ = _build(args.nodes, args.rounds)
    lock = threading.Lock()  # the nodes of this process share one model replica
    tls = Path(args.tls)
    clients = []
    for cid in args.ids.split(","):
        node = Node(NodeContext(cid, dataset.client(cid)), algorithm.handlers())
        clients.append(NodeClient(args.address, node, lock=lock, backoff=Backoff(0.2, 2.0),
                                  identity=Identity(tls / f"{cid}.key", tls / f"{cid}.crt",
                                                    tls / "ca.crt")))
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def network_variant(nodes: int, rounds: int, kill_rounds: list[int]) -> dict:
    import torch

    from shoal.net import CertificateAuthority, GrpcTransport, Identity
    from shoal.net.deploy import WaitForNodes
    from shoal.run import run

    torch.set_num_threads(1)
    _, dataset, algorithm, _, params0 = _build(nodes, rounds)
    tmp = Path(tempfile.mkdtemp(prefix="shoal-load-"))
    ca = CertificateAuthority.init(tmp)
    ids = dataset.client_ids()
    for cid in ids:
        ca.enroll(cid, tmp)
    coord = GrpcTransport("127.0.0.1:0", crl=tmp / "crl.pem", max_workers=nodes + 32,
                          identity=Identity(tmp / "coordinator.key", tmp / "coordinator.crt",
                                            tmp / "ca.crt"))
    groups = [ids[i::HOSTS] for i in range(HOSTS)]
    env = {**os.environ}
    env.pop("REQUESTS_CA_BUNDLE", None)
    env.pop("CURL_CA_BUNDLE", None)

    def start(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, __file__, "--variant", "host", "--ids", ",".join(groups[i]),
             "--address", coord.address, "--tls", str(tmp), "--nodes", str(nodes),
             "--rounds", str(rounds)], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    procs = [start(i) for i in range(HOSTS)]
    killed = 0

    class Chaos:
        """Kill a host process while the round runs, and restart it."""

        def before_round(self, ctx: object, r: int) -> None:
            nonlocal killed
            if r not in kill_rounds:
                return
            i = kill_rounds.index(r) % HOSTS

            start_replies = coord.stats.messages_up

            def kill() -> None:
                # Mid-round: once a tenth of the replies arrived, before the rest.
                nonlocal killed
                while coord.stats.messages_up < start_replies + max(1, nodes // 10):
                    time.sleep(0.001)
                procs[i].send_signal(signal.SIGKILL)
                procs[i].wait()
                killed += len(groups[i])
                procs[i] = start(i)
            threading.Thread(target=kill, daemon=True).start()

    wait = WaitForNodes(coord, nodes, 120)
    t0 = time.perf_counter()
    res = run(algorithm, coord, rounds=rounds, params=params0, callbacks=[wait, Chaos()])
    total = time.perf_counter() - t0
    coord.close()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    h = res.history
    sampled = sum(x["round/sampled"] for x in h)
    return {
        "round_s": statistics.median(x["time/round_s"] for x in h),
        "rounds_completed": sum(1 for x in h if "round/failed" not in x),
        "rounds_lost": rounds - sum(1 for x in h if "round/failed" not in x),
        "dropped": sum(x["round/dropped"] for x in h),
        "killed": killed,
        "bytes_per_client_round": (coord.wire_bytes_down + coord.wire_bytes_up) / sampled,
        "message_bytes_per_client_round": sum(x["comm/bytes_down"] + x["comm/bytes_up"]
                                              for x in h) / sampled,
        "total_s": total,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="20 nodes, 5 rounds")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--variant")
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--ids")
    ap.add_argument("--address")
    ap.add_argument("--tls")
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.rounds = 20, 5
    kill_rounds = [r for r in (3, 7, 11, 15, 19) if r <= args.rounds] if not args.quick else [2, 4]
    if args.variant == "host":
        host_variant(args)
        return
    if args.variant == "sim":
        emit(sim_variant(args.nodes, args.rounds))
        return
    if args.variant == "network":
        emit(network_variant(args.nodes, args.rounds, kill_rounds))
        return
    print(f"network load: {args.nodes} nodes in {HOSTS} processes, {args.rounds} rounds, "
          f"one process (20 %) killed in rounds {kill_rounds}; {machine()}")
    runs = alternate(__file__, ["sim", "network"], args.reps,
                     ["--nodes", str(args.nodes), "--rounds", str(args.rounds)])
    net, sim = runs["network"], runs["sim"]
    print(f"median round: network {median(net, 'round_s'):.3f} s, simulation "
          f"{median(sim, 'round_s'):.3f} s; clients killed during rounds: "
          f"{median(net, 'killed'):.0f}, replies dropped: {median(net, 'dropped'):.0f}; "
          f"message bytes per client round {median(net, 'message_bytes_per_client_round'):.0f}")
    final_line(rounds_completed=int(min(r["rounds_completed"] for r in net)),
               rounds_lost=int(max(r["rounds_lost"] for r in net)),
               network_overhead_ratio=median(net, "round_s") / median(sim, "round_s"),
               bytes_per_client_round=median(net, "bytes_per_client_round"))


if __name__ == "__main__":
    main()
