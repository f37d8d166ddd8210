"""Split learning on Fashion-MNIST vs FedAvg and the centralized baseline: accuracy and bytes.

10 IID clients; the McMahan et al. (2017) CNN, cut after its convolutional block (layer 5,
activations of 64x7x7 per example) and, for the U-shaped variant, again after the first dense
layer (layer 8: the 512 -> 10 head and the labels stay with the clients). Every variant sees
the same examples per round (all 10 clients, ``--steps`` batches of 32 each per round, plain
SGD at lr 0.05): vanilla split learning (clients take turns), SplitFed (clients in parallel,
client parts averaged), U-shaped, FedAvg (one local pass) and the centralized baseline on the
pooled data. Bytes are everything that crossed the transport, both ways, and per epoch (60,000
examples seen).

Each (variant, seed) runs in its own process; variants alternate; figures are medians.

    python benchmarks/split_fmnist.py [--seeds 0 1] [--rounds 5] [--steps 30] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, final_line, machine, peak_rss_gib, run_child  # noqa: E402

VARIANTS = ("vanilla", "splitfed", "ushaped", "fedavg")
EPOCH = 60_000


def overrides(variant: str, args: argparse.Namespace) -> list[str]:
    """The config of one variant."""
    out = [f"seed={args.seed}", "task.name=fashion_mnist", "data.partition=iid",
           "data.num_clients=10", "data.eval_fraction=0", "federated.clients_per_round=10",
           f"federated.rounds={args.rounds}", "client.epochs=1", "client.batch_size=32",
           "client.lr=0.05", f"client.max_steps={args.steps}", "evaluation.central_every=0",
           "evaluation.batch_size=1000", f"baseline={'true' if variant == 'vanilla' else 'false'}"]
    if variant == "fedavg":
        return [*out, "paradigm=federated"]
    out += ["paradigm=split", "split.cut=5", "split.leakage=false"]
    if variant == "splitfed":
        out.append("split.schedule=splitfed")
    if variant == "ushaped":
        out.append("split.head_cut=8")
    return out


def child(args: argparse.Namespace) -> None:
    """Run one variant (vanilla also runs the centralized baseline); print figures as JSON."""
    import torch

    from shoal.config import load_config
    from shoal.experiment import run_experiment
    torch.set_num_threads(1)
    config = load_config(None, overrides(args.variant, args))
    with tempfile.TemporaryDirectory() as tmp:
        results = run_experiment(config, tmp)
    out = {}
    for r in results:
        name = "centralized" if r.paradigm == "centralized" else args.variant
        out[f"{name}_accuracy"] = r.final["accuracy"]
        out[f"{name}_bytes"] = r.bytes
        out[f"{name}_examples"] = r.examples
        out[f"{name}_seconds"] = r.seconds
        if r.paradigm != "centralized":
            up = sum(h["comm/bytes_up"] for h in r.history)
            down = sum(h["comm/bytes_down"] for h in r.history)
            out[f"{name}_bytes_up_per_epoch"] = up * EPOCH / r.examples
            out[f"{name}_bytes_down_per_epoch"] = down * EPOCH / r.examples
    out["peak_rss_gib"] = peak_rss_gib()
    emit(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check it works")
    args = ap.parse_args()
    if args.variant:
        child(args)
        return
    if args.quick:
        args.seeds, args.rounds, args.steps = [0], 1, 2
    print(f"split_fmnist: {machine()}")
    print(f"10 clients, {args.rounds} rounds of {args.steps} batches of 32 per client")
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    extra = ["--rounds", str(args.rounds), "--steps", str(args.steps)]
    for seed in args.seeds:
        for v in VARIANTS:
            r = run_child(__file__, v, ["--seed", str(seed), *extra])
            runs[v].append(r)
            print(f"  seed {seed} {v:<9} {json.dumps({k: round(x, 4) for k, x in r.items()})}",
                  flush=True)
    merged = {k: statistics.median(r[k] for r in rs) for rs in runs.values() for k in rs[0]}
    for v in (*VARIANTS, "centralized"):
        line = (f"{v:<11} accuracy {merged[f'{v}_accuracy']:.4f}  examples "
                f"{merged[f'{v}_examples']:.0f}  bytes {merged[f'{v}_bytes'] / 1e6:.1f} MB")
        if f"{v}_bytes_up_per_epoch" in merged:
            line += (f"  per epoch: up {merged[f'{v}_bytes_up_per_epoch'] / 1e6:.1f} MB, down "
                     f"{merged[f'{v}_bytes_down_per_epoch'] / 1e6:.1f} MB")
        print(line)
    final_line(**{f"{v}_accuracy": merged[f"{v}_accuracy"] for v in (*VARIANTS, "centralized")},
               **{f"{v}_bytes": merged[f"{v}_bytes"] for v in VARIANTS})


if __name__ == "__main__":
    main()
