"""Companies predict when their engines will fail, together, without sharing their logs.

The seeds' industrial scenario ("owners of production machines contribute their sensitive
machine production and downtime data to the training of a predictive maintenance model"): every
company runs its own fleet of turbofan engines and logs their sensors until each engine fails.
A company's logs reveal its operations, so none will pool them with a competitor's; yet one
fleet has seen few failures. Here the built-in ``cmapss`` task (NASA C-MAPSS FD001: 100 engines
run to failure, shipped inside shoal with its attribution) is dealt out to ``--companies``
companies, each a fleet of whole engines, and the companies learn to predict the remaining
useful life (RUL, in cycles) by federated regression. Everything is measured on the same test
set: the last 30 cycles of each of the 100 test engines, against their true RUL.

Three answers, each a run directory under ``--out``:

* ``federated/``: FedAvg over the companies, every company in every round, with the
  centralized baseline (all engines pooled: what privacy costs);
* ``alone/<company>/``: each company trained alone on its own engines, with the same budget
  (rounds, epochs, batch size, learning rate: what collaborating gains).

It prints the RMSE of each, whether the federated model beats the best single company's own
model, and ends by writing the report of the federated run (``federated/report.html``)::

    python examples/factories.py [--rounds 30] [--companies 5] [--out runs/maintenance]

The task is :func:`fleets` in this file (``task.name = "factories:fleets"`` from a config, run
from ``examples/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from shoal.data.tasks import Task, load_task


def fleet_of(engines: np.ndarray, companies: int, seed: int) -> dict[str, str]:
    """``{engine id: company id}``: the engines shuffled with ``seed`` and dealt into
    ``companies`` fleets of near-equal size, ``"company-1"`` ... (whole engines, never split)."""
    order = np.random.default_rng(seed).permutation(np.unique(engines))
    return {str(e): f"company-{c + 1}"
            for c, part in enumerate(np.array_split(order, companies)) for e in part}


def fleets(*, companies: int = 5, company: str = "", seed: int = 0, window: int = 30,
           max_rul: int = 125, hidden: int = 64) -> Task:
    """The ``cmapss`` task (``window``, ``max_rul``, ``hidden`` are its options) with one
    client per company: the 100 training engines dealt into ``companies`` fleets by
    :func:`fleet_of`. ``company`` (e.g. ``"company-2"``) keeps only that company's engines in
    the training pool: the company alone. The test set is always all 100 test engines."""
    task = load_task("cmapss", window=window, max_rul=max_rul, hidden=hidden)
    if not 1 <= companies <= 100:
        raise SystemExit(f"factories example: companies must be in 1..100 (got {companies}).")
    assert task.groups is not None
    owner = fleet_of(task.groups, companies, seed)
    groups = np.array([owner[e] for e in task.groups])  # (windows,) company of each window
    train = task.train
    if company:
        if company not in set(owner.values()):
            raise SystemExit(f"factories example: no company {company!r}; expected "
                             f"company-1 ... company-{companies}.")
        keep = np.flatnonzero(groups == company)
        train, groups = train.subset(keep), groups[keep]
    return dataclasses.replace(
        task, name="cmapss_fleets", train=train, groups=groups,
        description=f"{task.description} Engines dealt into {companies} companies"
                    + (f"; only {company}'s engines." if company else "."))


def configs(args: argparse.Namespace, extra: list[str] | None = None) -> dict[str, object]:
    """``{"federated": config, "alone/company-1": config, ...}`` from the command line:
    the same model, seed and budget for each; ``extra``: more overrides for all."""
    from shoal.config import load_config

    common = [
        f"seed={args.seed}", f"federated.rounds={args.rounds}",
        f"client.epochs={args.epochs}", f"client.batch_size={args.batch_size}",
        f"client.lr={args.lr}", "client.momentum=0.9", "data.eval_fraction=0.2",
        f"evaluation.central_every={max(1, args.rounds // 10)}",
        f"checkpoint.every={args.rounds}", "checkpoint.keep=1", *(extra or []),
    ]
    task = ["task.name=factories:fleets", f"task.companies={args.companies}"]
    out = {"federated": load_config(None, [
        *task, *common, "paradigm=federated", "baseline=true",
        f"federated.clients_per_round={args.companies}"])}
    for c in range(1, args.companies + 1):
        out[f"alone/company-{c}"] = load_config(None, [
            *task, f"task.company=\"company-{c}\"", *common, "paradigm=centralized",
            "baseline=false", "federated.clients_per_round=1"])
    return out


def main(argv: list[str] | None = None) -> Path:
    """Run the federation and each company alone, print the RMSEs, write the report; return
    the report's path."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--companies", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/maintenance",
                    help="directory for every run and the report (refused if it holds "
                         "files; --overwrite replaces an earlier run of this example)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier run of this example in --out")
    args = ap.parse_args(argv)

    from shoal.experiment import run_experiment
    from shoal.report import write_report

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # "factories:fleets"
    from _outdir import prepare_out

    out = prepare_out(args.out, "federated/config.toml", "factories", args.overwrite)
    rmse: dict[str, float] = {}
    for name, config in configs(args).items():
        print(f"running {name} ...", flush=True)
        for r in run_experiment(config, out / name):
            if name != "federated":
                label = name.removeprefix("alone/") + " alone"
            else:
                label = "federated" if r.paradigm == "federated" else "centralized (pooled)"
            rmse[label] = r.final["rmse"]
    owner = fleet_of(np.array([f"engine-{u:03d}" for u in range(1, 101)]), args.companies, 0)
    sizes = {f"{c} alone": list(owner.values()).count(c) for c in set(owner.values())}

    print(f"\nremaining useful life of the 100 test engines, RMSE in cycles (lower is better), "
          f"{args.rounds} rounds:")
    for label, value in rmse.items():
        n = sizes.get(label)
        print(f"  {label:<24} {value:7.2f}" + (f"   ({n} engines)" if n else ""))
    alone = {k: v for k, v in rmse.items() if k.endswith(" alone")}
    best = min(alone, key=alone.__getitem__)
    fed = rmse["federated"]
    verdict = (f"beats the best single company's own model "
               f"({best.removesuffix(' alone')}: {alone[best]:.2f}) by {alone[best] - fed:.2f}"
               if fed < alone[best] else
               f"does NOT beat the best single company's own model "
               f"({best.removesuffix(' alone')}: {alone[best]:.2f}), worse by "
               f"{fed - alone[best]:.2f}")
    print(f"federated RMSE {fed:.2f} {verdict} cycles")
    report = write_report(out / "federated")
    print(f"report: {Path(report).resolve()}")
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)  # a small MLP: one thread is as fast, and shares the cores
    main()
