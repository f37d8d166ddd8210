"""Four hospitals learn a heart-disease model together; no patient record leaves its hospital.

The seeds' health scenario: a diagnosis model that needs more patients than any one clinic has.
The built-in ``heart`` task holds the UCI Heart Disease records of four real hospitals
(Cleveland, Budapest, Zurich/Basel, Long Beach); each hospital is one client. Every round the
coordinator sends the model to all four, each trains one epoch on its own patients and returns
only the change to the model; the coordinator averages the changes, weighted by patients.

Afterwards each hospital tests the global model on its own held-out patients (federated
evaluation) — the number a hospital cares about — and the coordinator tests on the pooled test
patients of all four, beside a model trained on the pooled data (what federating cost).

    python examples/hospitals.py [--rounds 40]
"""

import argparse

import torch

import shoal

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rounds", type=int, default=40)
args = ap.parse_args()

task = shoal.load_task("heart")                        # model, loss, data: all shipped offline
hospitals = shoal.federate(task, eval_fraction=0.25, seed=0)  # one client per hospital
print(task.description)
for h in hospitals.client_ids():
    c = hospitals.client(h)
    print(f"  {h:<12} {len(c.train):3d} patients to train on, {len(c.eval):3d} to test with")

torch.manual_seed(0)
model = task.model_fn()
evaluator = shoal.Evaluator(model, task.loss_fn, auc=True)
fedavg = shoal.FedAvg(
    shoal.local_sgd(model, task.loss_fn, epochs=1, batch_size=16,
                    optimizer=shoal.optimizer_fn("SGD", lr=0.05)),
    client_eval=evaluator,      # what each hospital runs on "evaluate"
    seed=0,
)
transport = shoal.InProcessTransport(hospitals.client_ids(), hospitals.client, fedavg.handlers())
federated_eval = shoal.FederatedEvaluation(every=args.rounds)
result = shoal.run(fedavg, transport, rounds=args.rounds, params=shoal.tree.params_of(model),
                   callbacks=[shoal.CentralEvaluation(lambda p: evaluator(p, task.test),
                                                      every=args.rounds),
                              federated_eval])

final = result.history[-1]
print(f"\nafter {args.rounds} rounds, the federated model:")
print(f"  pooled test patients of all hospitals: accuracy {final['central/accuracy']:.3f}, "
      f"ROC AUC {final['central/auc']:.3f}")
for h, m in sorted(federated_eval.last_per_client.items()):
    print(f"  {h:<12} on its own test patients: accuracy {m['accuracy']:.3f}")
print(f"  worst hospital: {final['fed_eval/accuracy_worst']:.3f}")

# The baseline: the same model trained on everybody's data pooled in one place.
torch.manual_seed(0)
pooled = shoal.Centralized(model, task.loss_fn, hospitals.pooled_train(),
                           examples_per_round=int(final["train/examples"]), batch_size=16,
                           optimizer=shoal.optimizer_fn("SGD", lr=0.05), seed=0)
baseline = shoal.run(pooled, shoal.FunctionTransport([], lambda m: m), rounds=args.rounds,
                     params=shoal.tree.params_of(task.model_fn()),
                     callbacks=[shoal.CentralEvaluation(lambda p: evaluator(p, task.test),
                                                        every=args.rounds)])
b = baseline.history[-1]
print(f"pooled-data baseline: accuracy {b['central/accuracy']:.3f}, ROC AUC {b['central/auc']:.3f}")
