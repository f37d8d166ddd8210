"""Four clinics learn a diagnosis model as a swarm: no aggregator, a signed ledger, one table.

The seeds' swarm-learning example (clinics predicting disease from patient data, Warnat-
Herresthal et al., Nature 2021): there is no coordination instance. Every clinic trains on its
own patients, records its update's hash on a permissioned ledger and serves the weights itself;
every clinic fetches the others' updates, checks each against its signed ledger entry, and
assembles the same model. Here the built-in ``heart`` task's four hospitals (Cleveland,
Budapest, Zurich/Basel, Long Beach) are the peers, simulated in one process on an in-process
ledger (``shoal swarm join`` runs the same peers over etcd and mutual TLS).

The table compares, on the pooled test patients of all four: the swarm, FedAvg with a
coordinator (same clients, same seed), the pooled-data baseline (what privacy cost), and each
clinic training alone (what collaborating gained).

    python examples/clinics_swarm.py [--rounds 40]
"""

import argparse
import tempfile

import shoal
from shoal.experiment import client_optimizer, initial_params, make_dataset, resolve_config

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rounds", type=int, default=40)
args = ap.parse_args()

common = ["task.name=heart", f"federated.rounds={args.rounds}", "client.batch_size=16",
          "federated.clients_per_round=4",
          "client.lr=0.05", "data.eval_fraction=0.25", "evaluation.federated_every=0"]
rows: list[tuple[str, dict[str, float], float]] = []
for paradigm in ("swarm", "federated"):
    config = shoal.load_config(None, [*common, f"paradigm={paradigm}",
                                      f"baseline={'true' if paradigm == 'swarm' else 'false'}"])
    with tempfile.TemporaryDirectory() as out:
        for r in shoal.run_experiment(config, out):
            name = {"swarm": "swarm (4 peers, ledger)", "federated": "FedAvg (coordinator)",
                    "centralized": "centralized (pooled data)"}[r.paradigm]
            rows.append((name, r.final, r.bytes))

# Each clinic alone: the same model and schedule on its own patients only.
config = shoal.load_config(None, [*common, "paradigm=centralized"])
task = shoal.load_task("heart")
config = resolve_config(config, task)
clinics = make_dataset(config, task)
evaluator = shoal.Evaluator.for_task(task, task.model_fn())
for clinic in clinics.client_ids():
    model, params0 = initial_params(config, task)
    data = clinics.client(clinic).train
    alone = shoal.Centralized(model, task.loss_fn, data, examples_per_round=len(data),
                              batch_size=16, optimizer=client_optimizer(config), seed=0)
    res = shoal.run(alone, shoal.FunctionTransport([], lambda m: m), rounds=args.rounds,
                    params=params0)
    rows.append((f"{clinic} alone", evaluator(alone.params(res.state), task.test), 0.0))

print(f"heart disease, pooled test patients of all four clinics, {args.rounds} rounds:")
print(f"  {'':<28} {'accuracy':>8} {'ROC AUC':>8} {'bytes':>10}")
for name, m, nbytes in rows:
    print(f"  {name:<28} {m['accuracy']:8.4f} {m['auc']:8.4f} {nbytes / 1e6:9.2f}M")
