"""SCAFFOLD against FedAvg under pathological label skew: rounds to a target accuracy.

Workload (issue "core contracts"): Fashion-MNIST, the MLP 784-64-10, 100 clients with 2 label
shards each (McMahan et al.'s pathological non-IID split), 10 clients per round, 5 local
epochs, batch 32, SGD lr 0.05, server learning rate 1, up to 100 rounds, central evaluation on
the 10,000 test images after every round; seeds 0, 1 and 2. Both algorithms run as
``shoal run`` builds them (``federated.algorithm = "fedavg" | "scaffold"``, the vectorized
executor), from the same seed: same partition, same cohorts, same initial model.

``rounds_ratio`` is the median over seeds of (rounds FedAvg needs to first reach 75 % test
accuracy) / (rounds SCAFFOLD needs); a run that never reaches it counts as the round limit.
The accuracies are the final round's, median over seeds. Rounds, not seconds, are compared,
so the figure does not depend on the machine's load.

    python benchmarks/scaffold.py [--seeds 0,1,2] [--rounds 100] [--target 0.75]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import final_line, machine  # noqa: E402

WORKLOAD = ["task.name=fashion_mnist", "task.model=mlp", "data.partition=shards",
            "data.num_clients=100", "data.shards_per_client=2", "data.eval_fraction=0",
            "federated.clients_per_round=10", "client.epochs=5", "client.batch_size=32",
            "client.lr=0.05", "federated.server_lr=1.0", "baseline=false",
            "federated.executor=vectorized", "evaluation.central_every=1"]


def curve(algorithm: str, seed: int, rounds: int) -> tuple[list[float], float, int]:
    """Test accuracy after each round, the seconds taken, and the bytes moved."""
    from shoal.config import load_config
    from shoal.experiment import run_experiment

    config = load_config(None, WORKLOAD + [f"federated.algorithm={algorithm}", f"seed={seed}",
                                           f"federated.rounds={rounds}"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        (result,) = run_experiment(config, tmp)
        seconds = time.perf_counter() - t0
    return [h["central/accuracy"] for h in result.history], seconds, int(result.bytes)


def rounds_to(accuracies: list[float], target: float, limit: int) -> int:
    """The first round (1-based) at or above ``target``; ``limit`` if none."""
    return next((r for r, a in enumerate(accuracies, 1) if a >= target), limit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--target", type=float, default=0.75)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"scaffold: {machine()}; seeds {seeds}, up to {args.rounds} rounds, target "
          f"{args.target:.0%}")
    ratios, final = [], {"fedavg": [], "scaffold": []}
    for seed in seeds:
        reached = {}
        for algorithm in ("fedavg", "scaffold"):
            acc, seconds, nbytes = curve(algorithm, seed, args.rounds)
            reached[algorithm] = rounds_to(acc, args.target, args.rounds)
            final[algorithm].append(acc[-1])
            marks = ", ".join(f"r{r}: {acc[r - 1]:.4f}" for r in (1, 10, 25, 50, 75, args.rounds)
                              if r <= len(acc))
            print(f"  seed {seed} {algorithm:<8} {reached[algorithm]:>3} rounds to "
                  f"{args.target:.0%}; final {acc[-1]:.4f}, best {max(acc):.4f} ({marks}); "
                  f"{seconds:.0f} s, {nbytes / 2**20:.0f} MiB", flush=True)
        ratios.append(reached["fedavg"] / reached["scaffold"])
    final_line(scaffold_accuracy=statistics.median(final["scaffold"]),
               fedavg_accuracy=statistics.median(final["fedavg"]),
               rounds_ratio=statistics.median(ratios))


if __name__ == "__main__":
    main()
