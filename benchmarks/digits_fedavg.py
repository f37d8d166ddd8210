"""FedAvg on scikit-learn's digits with label skew, against the centralized baseline.

20 clients, Dirichlet(0.5) label skew, 10 clients per round, 30 rounds, 5 local epochs of SGD
(batch 16, lr 0.1) — the built-in default of ``shoal run`` — for several seeds. The baseline
trains the same model from the same initialisation on the pooled data for as many examples.

    python benchmarks/digits_fedavg.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import final_line, machine  # noqa: E402

from shoal.config import load_config  # noqa: E402
from shoal.experiment import run_experiment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    print(f"digits_fedavg: {machine()}")
    fed, cen = [], []
    for seed in args.seeds:
        config = load_config(None, [f"seed={seed}", "task.name=digits",
                                    "data.partition=dirichlet", "data.alpha=0.5",
                                    "data.num_clients=20"])
        with tempfile.TemporaryDirectory() as tmp:
            f, c = run_experiment(config, tmp)
        fed.append(f.final["accuracy"])
        cen.append(c.final["accuracy"])
        curve = [round(h["central/accuracy"], 3) for h in f.history]
        print(f"seed {seed}: FedAvg {f.final['accuracy']:.4f} (worst client "
              f"{f.final['fed_eval/accuracy_worst']:.3f}, p10 {f.final['fed_eval/accuracy_p10']:.3f},"
              f" {f.seconds:.1f} s), centralized {c.final['accuracy']:.4f} ({c.seconds:.1f} s)")
        print(f"  FedAvg accuracy by round: {curve}")
    print(f"mean over seeds {args.seeds}: FedAvg {statistics.mean(fed):.4f} (min {min(fed):.4f}),"
          f" centralized {statistics.mean(cen):.4f}")
    final_line(fedavg_accuracy=statistics.mean(fed), centralized_accuracy=statistics.mean(cen))


if __name__ == "__main__":
    main()
