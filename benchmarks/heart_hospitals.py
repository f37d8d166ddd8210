"""Four hospitals: FedAvg vs each hospital alone vs pooling everything (UCI Heart Disease).

The seeds' health example: a diagnosis model that no single hospital has the data for
("statistical predictions only possible with many data points"). Each hospital is one client
(Cleveland 303, Hungary 294, Switzerland 123, VA 200 patients; 75 % for training). Compared, on
the pooled test set of all four hospitals (and on each hospital's own test patients):

* ``fedavg`` — all four hospitals every round, 1 local epoch, logistic regression;
* ``alone``  — each hospital trains the same model on its own patients only, for as many local
  epochs as it trained in the federation;
* ``centralized`` — the same model on the pooled training data, as many examples as FedAvg.

Means over several seeds (initialisation and batch order; the patients' split is fixed).

    python benchmarks/heart_hospitals.py [--seeds 0 1 2 3 4] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from common import final_line, machine  # noqa: E402

from shoal.algorithms.centralized import Centralized  # noqa: E402
from shoal.callbacks import CentralEvaluation  # noqa: E402
from shoal.client import optimizer_fn  # noqa: E402
from shoal.config import load_config  # noqa: E402
from shoal.data import load_task  # noqa: E402
from shoal.experiment import initial_params, make_dataset, resolve_config, run_experiment  # noqa: E402
from shoal.metrics import Evaluator  # noqa: E402
from shoal.run import run  # noqa: E402
from shoal.transport import FunctionTransport  # noqa: E402

EPOCHS, BATCH, LR = 1, 16, 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    print(f"heart_hospitals: {machine()}")
    task = load_task("heart")
    groups = np.asarray(task.test_groups)
    hospitals = sorted(set(groups.tolist()))
    by_hospital = {h: task.test.subset(torch.from_numpy(np.flatnonzero(groups == h)))
                   for h in hospitals}
    evaluator = Evaluator(task.model_fn(), task.loss_fn, auc=True)
    rows: dict[str, list[dict[str, float]]] = {"fedavg": [], "centralized": []}
    alone: dict[str, list[dict[str, float]]] = {h: [] for h in hospitals}
    own: dict[str, dict[str, list[float]]] = {h: {"fedavg": [], "alone": []} for h in hospitals}

    for seed in args.seeds:
        config = load_config(None, [
            f"seed={seed}", "task.name=heart", "data.partition=natural", "data.eval_fraction=0",
            f"federated.rounds={args.rounds}", "federated.clients_per_round=4",
            f"client.epochs={EPOCHS}", f"client.batch_size={BATCH}", f"client.lr={LR}"])
        with tempfile.TemporaryDirectory() as tmp:
            fed, cen = run_experiment(config, tmp)
            fed_params = load_file(str(Path(tmp) / "federated" / "model.safetensors"))
        rows["fedavg"].append(fed.final)
        rows["centralized"].append(cen.final)

        config = resolve_config(config, task)
        dataset = make_dataset(config, task)
        model, params0 = initial_params(config, task)
        for h in hospitals:
            data = dataset.client(h).train
            solo = Centralized(model, task.loss_fn, data, examples_per_round=len(data) * EPOCHS,
                               batch_size=BATCH, optimizer=optimizer_fn("SGD", lr=LR),
                               seed=seed)
            res = run(solo, FunctionTransport([], lambda m: m), rounds=args.rounds,
                      params=params0, callbacks=[
                          CentralEvaluation(lambda p: evaluator(p, task.test), every=args.rounds)])
            alone[h].append({k.removeprefix("central/"): v for k, v in res.history[-1].items()
                             if k.startswith("central/")})
            own[h]["alone"].append(evaluator(res.state.params, by_hospital[h])["auc"])
            own[h]["fedavg"].append(evaluator(fed_params, by_hospital[h])["auc"])

    def mean(rs: list[dict[str, float]], k: str) -> float:
        return statistics.mean(r[k] for r in rs)

    print(f"\npooled test set ({len(task.test)} patients), means over seeds {args.seeds}:")
    print(f"  {'model':<24} {'accuracy':>9} {'ROC AUC':>9}")
    for name in ("fedavg", "centralized"):
        print(f"  {name:<24} {mean(rows[name], 'accuracy'):9.4f} {mean(rows[name], 'auc'):9.4f}")
    for h in hospitals:
        print(f"  {h + ' alone':<24} {mean(alone[h], 'accuracy'):9.4f} {mean(alone[h], 'auc'):9.4f}")
    print("\neach hospital's own test patients, ROC AUC: FedAvg model vs its own model")
    for h in hospitals:
        print(f"  {h:<12} ({len(by_hospital[h]):3d} patients)  fedavg "
              f"{statistics.mean(own[h]['fedavg']):.4f}   alone {statistics.mean(own[h]['alone']):.4f}")
    best = max(hospitals, key=lambda h: mean(alone[h], "auc"))
    print(f"\nbest single hospital on the pooled test set: {best}")
    final_line(fedavg_auc=mean(rows["fedavg"], "auc"),
               best_single_hospital_auc=mean(alone[best], "auc"),
               centralized_auc=mean(rows["centralized"], "auc"),
               fedavg_accuracy=mean(rows["fedavg"], "accuracy"),
               best_single_hospital_accuracy=mean(alone[best], "accuracy"),
               centralized_accuracy=mean(rows["centralized"], "accuracy"))



if __name__ == "__main__":
    main()
