"""Factories predict machine failures together without sharing their process data.

The seeds' industrial scenario ("predictive monitoring and maintenance"): every plant logs the
temperatures, speed, torque and tool wear of its milling machines and the rare failures; no
single plant sees enough failures to learn them, and none will hand its process data to a
competitor or a vendor. The built-in ``ai4i`` task (AI4I 2020, 10,000 records, 3.4 % failures)
is split into production lines; this example runs the config file beside it, once with the
three natural lines and once with twelve simulated plants of very different sizes
(``quantity`` skew), each time beside the pooled-data baseline, and prints what federating cost
in accuracy and ROC AUC.

    python examples/factories.py [--rounds 20]
"""

import argparse
import tempfile
from pathlib import Path

import shoal
from shoal.cli.display import cost_line

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rounds", type=int, default=20)
args = ap.parse_args()

config_file = Path(__file__).parent / "configs" / "factories.toml"
setups = {
    "3 production lines": [],
    "12 plants, quantity skew": ["data.partition=quantity", "data.num_clients=12",
                                 "data.alpha=0.5", "federated.clients_per_round=6"],
}
for name, overrides in setups.items():
    config = shoal.load_config(config_file, [f"federated.rounds={args.rounds}", *overrides])
    with tempfile.TemporaryDirectory() as out:
        results = shoal.run_experiment(config, out)
    fed = results[0].final
    print(f"{name}: federated accuracy {fed['accuracy']:.4f}, ROC AUC {fed['auc']:.4f}; "
          f"worst client accuracy {fed['fed_eval/accuracy_worst']:.4f}")
    print(f"  {cost_line(results)}")
