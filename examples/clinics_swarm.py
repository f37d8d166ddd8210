"""Four clinics learn a diagnosis model as a swarm: no aggregator, a signed ledger, one report.

The seeds' swarm-learning example (clinics predicting disease from patient data, Warnat-
Herresthal et al., Nature 2021): there is no coordination instance. Every clinic trains on its
own patients, records its update's hash on a permissioned ledger and serves the weights itself;
every clinic fetches the others' updates, checks each against its signed ledger entry, and
assembles the same model. Here the built-in ``heart`` task's four hospitals (Cleveland,
Budapest, Zurich/Basel, Long Beach) are the peers, simulated in one process on an in-process
ledger (``shoal swarm join`` runs the same peers over etcd and mutual TLS).

``shoal.compare`` runs, at an equal budget of examples seen, the swarm, FedAvg with a
coordinator (same clients, same seed) and the pooled-data baseline (what privacy costs); then
each clinic trains alone on its own patients with the same schedule (what collaborating
gained). Everything is tested on the pooled test patients of all four. The comparison and the
clinics' own runs land under ``--out``, and the example ends by writing the comparison's report
(``report.html``)::

    python examples/clinics_swarm.py [--rounds 40] [--out runs/clinics]

The clinic-alone task is :func:`clinic` in this file (``task.name = "clinics_swarm:clinic"``
from a config, run from ``examples/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from shoal.data.task_heart import HOSPITALS
from shoal.data.tasks import Task, load_task

VARIANTS = ["swarm", "federated", "centralized"]
"""What the comparison runs (:data:`shoal.compare.VARIANTS`)."""


def clinic(*, hospital: str = "cleveland", model: str = "logistic") -> Task:
    """The ``heart`` task with only clinic ``hospital``'s training patients (one of
    :data:`shoal.data.task_heart.HOSPITALS`); the test set stays the pooled test patients of
    all four clinics."""
    task = load_task("heart", model=model)
    if hospital not in HOSPITALS:
        raise SystemExit(f"clinics example: no clinic {hospital!r}; expected one of "
                         f"{', '.join(HOSPITALS)}.")
    assert task.groups is not None
    keep = np.flatnonzero(task.groups == hospital)
    return dataclasses.replace(task, name=f"heart_{hospital}", train=task.train.subset(keep),
                               groups=task.groups[keep],
                               description=f"{task.description} Only {hospital}'s patients.")


def base_overrides(args: argparse.Namespace) -> list[str]:
    """The settings every run shares: the schedule, the optimizer, the held-out splits."""
    return [f"seed={args.seed}", f"federated.rounds={args.rounds}",
            "federated.clients_per_round=4", "client.epochs=1", "client.batch_size=16",
            "client.lr=0.05", "data.eval_fraction=0.25",
            "evaluation.validation_fraction=0.1",
            f"evaluation.patience={args.rounds}",  # no early stop: every run has its budget
            f"evaluation.central_every={max(1, args.rounds // 10)}",
            f"checkpoint.every={args.rounds}", "checkpoint.keep=1"]


def main(argv: list[str] | None = None) -> Path:
    """Run the comparison and each clinic alone, print the table, write the report; return
    the report's path."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/clinics",
                    help="directory for the comparison, the clinics' own runs and the report "
                         "(refused if it holds files; --overwrite replaces an earlier run of "
                         "this example)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier run of this example in --out")
    args = ap.parse_args(argv)

    from shoal.compare import compare, write_compare_report
    from shoal.config import load_config
    from shoal.experiment import run_experiment

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # "clinics_swarm:clinic"
    from _outdir import prepare_out

    out = prepare_out(args.out, "compare.json", "clinics_swarm", args.overwrite)
    common = base_overrides(args)
    rows: list[tuple[str, dict[str, float], float]] = []
    labels = {"swarm": "swarm (4 peers, ledger)", "federated": "FedAvg (coordinator)",
              "centralized": "centralized (pooled data)"}
    finished = compare(load_config(None, ["task.name=heart", "paradigm=federated", *common]),
                       out, only=VARIANTS)
    for r in sorted(finished, key=lambda r: VARIANTS.index(r.name)):
        if r.status != "finished":
            raise SystemExit(f"clinics example: {r.name} {r.status}: {r.reason}")
        (entry,) = json.loads((out / r.run_dir / "summary.json").read_text())["results"]
        rows.append((labels[r.name], entry["final"], entry["bytes"]))

    # Each clinic alone: the same model and schedule on its own patients only.
    for hospital in HOSPITALS:
        config = load_config(None, ["task.name=clinics_swarm:clinic",
                                    f"task.hospital={hospital}",
                                    "paradigm=centralized", "baseline=false", *common,
                                    "federated.clients_per_round=1"])
        (r,) = run_experiment(config, out / "alone" / hospital)
        rows.append((f"{hospital} alone", r.final, 0.0))

    print(f"\nheart disease, pooled test patients of all four clinics, {args.rounds} rounds:")
    print(f"  {'':<28} {'accuracy':>8} {'ROC AUC':>8} {'bytes':>10}")
    for name, m, nbytes in rows:
        print(f"  {name:<28} {m['accuracy']:8.4f} {m['auc']:8.4f} {nbytes / 1e6:9.2f}M")
    report = write_compare_report(out)
    print(f"report: {Path(report).resolve()}")
    return report  # type: ignore[return-value]


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # a logistic regression: more threads only wait on each other
    main()
