"""What secure aggregation (SecAgg+) costs: time per round, client masking, coordinator
unmasking, and bytes on the wire.

* ``plain`` / ``secure``: one round of FedAvg / SecureFedAvg with 100 clients and a model of
  ``--params`` parameters, every client simulated in this process (in-process transport). The
  clients' update is synthetic (seeded random numbers, no training), so the difference is the
  protocol: key agreement, Shamir sharing, encryption, quantization, masking and unmasking.
  ``secagg_round_overhead_s`` is the median secure round minus the median plain round;
  ``wire_expansion`` is the bytes a secure round moves (both ways) over the plain round's.
* ``passive``: the same secure round with the protocol as it was before it defended against
  active attackers (revision ``--passive-rev``, checked out into a temporary git worktree and
  imported from there): no signatures, no commitments, no consistency round.
  ``secagg_round_overhead_passive_s`` is its median minus the plain median, measured in the
  same alternation, so the cost of active security is the difference of the two overheads.
* ``mask``: 20 clients, complete graph, so each masks with 19 neighbours; the time inside each
  client's ``secagg.masked_input`` handler (quantization, 19 key agreements, 20 AES-CTR masks),
  measured by a node middleware, median over clients -> ``client_mask_s``. One thread.
* ``unmask``: 500 clients, 10 % of them dropping after key sharing; the coordinator's own time
  to rebuild the secrets from the shares and remove the masks -> ``server_unmask_s``.

Each variant runs in its own process, plain, passive and secure alternating; figures are
medians.

    python benchmarks/secagg_cost.py [--reps 3] [--params 1000000] [--quick] [--passive-rev REV]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, final_line, machine, median, run_child  # noqa: E402

SEED = 0
PASSIVE_REV = "c0ac992"
"""The last revision whose secure aggregation was secure against honest-but-curious parties
only (no signed keys, no commitments, no consistency round)."""


def _update_fn(n: int):
    from shoal.seeding import numpy_rng
    from shoal.types import ClientResult

    def update(params, data, info):
        rng = numpy_rng(SEED, "bench-update", info.client_id)
        delta = torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.01)
        return ClientResult({"w": delta}, weight=50.0, metrics={"train/loss": 1.0,
                                                                "train/examples": 50.0})
    return update


def round_variant(kind: str, clients: int, n: int) -> dict:
    from shoal.algorithms.fedavg import FedAvg
    from shoal.secagg import SecureFedAvg
    from shoal.sim import InProcessTransport

    torch.set_num_threads(1)
    ids = [f"client-{i:03d}" for i in range(clients)]
    update = _update_fn(n)
    alg = SecureFedAvg(update, seed=SEED) if kind == "secure" else FedAvg(update, seed=SEED)
    transport = InProcessTransport(ids, lambda _: None, alg.handlers(), on_error="raise")
    state = alg.init({"w": torch.zeros(n)})
    t0 = time.perf_counter()
    state, report = alg.round(state, transport, 1)
    seconds = time.perf_counter() - t0
    assert report.failed is None, report.failed
    s = transport.stats
    return {"seconds": seconds, "bytes": s.bytes_down + s.bytes_up, "bytes_up": s.bytes_up,
            "norm": float(state.params["w"].norm())}


def _session(clients: int, n: int, neighbours: int | None, drop: float) -> tuple[dict, list]:
    from shoal.secagg import secure_sum
    from shoal.secagg.protocol import MASKED_INPUT, SecAggClient
    from shoal.seeding import numpy_rng
    from shoal.sim import InProcessTransport, simulated_dropout

    torch.set_num_threads(1)
    ids = [f"client-{i:03d}" for i in range(clients)]
    base = numpy_rng(SEED, "bench-base").standard_normal(n)

    def vector(message, context):
        return [(base * (1 + int(context.node_id[-3:]) / clients), 10.0)]

    handler_s: list[float] = []

    def timer(message, context, next_handler):
        t0 = time.perf_counter()
        reply = next_handler(message, context)
        if message.kind == MASKED_INPUT:
            handler_s.append(time.perf_counter() - t0)
        return reply

    mods = [simulated_dropout(drop, SEED, (MASKED_INPUT,))] if drop else []
    transport = InProcessTransport(ids, lambda _: None,
                                   SecAggClient({"v": vector}, SEED).handlers(),
                                   mods=[timer, *mods], on_error="raise")
    res = secure_sum(transport, ids, round=1, session="bench", task="v", length=n,
                     neighbours=neighbours, seed=SEED)
    assert res.failed is None, res.failed
    return {"contributors": len(res.contributors), "neighbours": res.neighbours,
            "threshold": res.threshold, **res.timings}, handler_s


def mask_variant(n: int) -> dict:
    info, handler_s = _session(20, n, 19, 0.0)
    return {"client_mask_s": statistics.median(handler_s), **info}


def unmask_variant(clients: int, n: int) -> dict:
    info, _ = _session(clients, n, None, 0.1)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["plain", "secure", "passive", "mask", "unmask"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--unmask-clients", type=int, default=500)
    ap.add_argument("--passive-rev", default=PASSIVE_REV,
                    help="git revision of the passive-only protocol ('' to skip it)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = ap.parse_args()
    if args.quick:
        args.params, args.clients, args.unmask_clients, args.reps = 20_000, 20, 50, 1
    if args.variant in ("plain", "secure", "passive"):
        emit(round_variant("plain" if args.variant == "plain" else "secure", args.clients,
                           args.params))
        return
    if args.variant == "mask":
        emit(mask_variant(args.params))
        return
    if args.variant == "unmask":
        emit(unmask_variant(args.unmask_clients, args.params))
        return
    sizes = ["--params", str(args.params), "--clients", str(args.clients),
             "--unmask-clients", str(args.unmask_clients)]
    print(f"secagg_cost: {machine()}; {args.clients} clients x {args.params:,} params, "
          f"{args.reps} reps, alternating")
    with tempfile.TemporaryDirectory(prefix="shoal-passive-") as tmp:
        runs = _rounds(args, sizes, Path(tmp) / "tree")
    plain_s, secure_s = median(runs["plain"], "seconds"), median(runs["secure"], "seconds")
    assert abs(runs["plain"][0]["norm"] - runs["secure"][0]["norm"]) < 1e-3 * runs["plain"][0][
        "norm"], "secure and plain aggregates differ"
    wire = runs["secure"][0]["bytes"] / runs["plain"][0]["bytes"]
    wire_up = runs["secure"][0]["bytes_up"] / runs["plain"][0]["bytes_up"]
    masks = [run_child(__file__, "mask", sizes) for _ in range(args.reps)]
    unmasks = [run_child(__file__, "unmask", sizes) for _ in range(max(1, args.reps // 2))]
    mask_s = median(masks, "client_mask_s")
    unmask_s = median(unmasks, "unmask_s")
    u = unmasks[0]
    print(f"round: plain {plain_s:.2f} s, secure {secure_s:.2f} s (medians); bytes per round: "
          f"plain {runs['plain'][0]['bytes']:,}, secure {runs['secure'][0]['bytes']:,} "
          f"(upload only: x{wire_up:.3f})")
    print(f"client masking, {args.params:,} params, 19 neighbours: {mask_s:.3f} s (median of "
          f"{len(masks)} runs x 20 clients)")
    print(f"coordinator unmasking, {args.unmask_clients} clients x {args.params:,} params, "
          f"{args.unmask_clients - u['contributors']} dropped, k={u['neighbours']}, "
          f"t={u['threshold']}: {unmask_s:.3f} s (summing the masked inputs as they arrived: "
          f"{median(unmasks, 'sum_s'):.3f} s)")
    passive = {}
    if runs["passive"]:
        passive_s = median(runs["passive"], "seconds")
        print(f"the passive-only protocol ({args.passive_rev}): {passive_s:.2f} s per round, "
              f"{runs['passive'][0]['bytes']:,} bytes")
        passive["secagg_round_overhead_passive_s"] = passive_s - plain_s
    final_line(secagg_round_overhead_s=secure_s - plain_s, **passive, client_mask_s=mask_s,
               server_unmask_s=unmask_s, wire_expansion=wire)


def _rounds(args: argparse.Namespace, sizes: list[str], tree: Path) -> dict[str, list[dict]]:
    """plain, passive (from ``tree``, a worktree of ``--passive-rev``) and secure, in turn."""
    root = Path(__file__).resolve().parent.parent
    variants = ["plain", "secure"]
    env: dict[str, dict[str, str]] = {}
    if args.passive_rev:
        made = subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "-q",
                               str(tree), args.passive_rev], capture_output=True, text=True)
        if made.returncode != 0:
            print(f"skipping the passive-only protocol: cannot check out {args.passive_rev} "
                  f"({made.stderr.strip()})")
        else:
            variants.insert(1, "passive")
            env["passive"] = {"PYTHONPATH": str(tree / "src")}
    runs: dict[str, list[dict]] = {v: [] for v in ["plain", "passive", "secure"]}
    try:
        for i in range(args.reps):
            for v in variants:
                runs[v].append(run_child(__file__, v, sizes, env.get(v)))
                shown = {k: round(x, 4) if isinstance(x, float) else x
                         for k, x in runs[v][-1].items()}
                print(f"  rep {i + 1}/{args.reps} {v:<8} {shown}", flush=True)
    finally:
        if "passive" in env:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)
    return runs


if __name__ == "__main__":
    main()
