"""What differential privacy costs in accuracy on Fashion-MNIST, sample-level and user-level.

* Sample level (``dpsgd``): DP-SGD with all 60,000 training images in one place, the end-to-end
  CNN of Tramèr & Boneh 2021 (26,010 parameters, tanh), inputs standardised, Poisson batches of
  expected size 2,048, clipping C = 0.1, SGD lr 4 with momentum 0.9, 40 epochs, noise calibrated
  to ε = 3 at δ = 1e-5 (PLD) — their Fashion-MNIST CNN setting (they report 86.0 %).
* User level (``fedavg`` / ``dp_eps1`` / ``dp_eps3`` / ``dp_eps8``): the 1,000-client
  Fashion-MNIST split (Dirichlet α = 0.3 label skew), the same CNN, Poisson cohorts of rate
  ``--cohort`` (default 0.5: 500 clients expected per round), ``--rounds`` rounds (default 40),
  1 local epoch of SGD (batch 16, lr 0.05), server optimizer FedAvgM (lr 1, momentum 0.9).
  DP-FedAvg uses adaptive clipping to the median update norm (Andrew et al. 2021: η = 0.2,
  σ_b = expected cohort / 20; initial C = 0.3, near the median norm of first-round updates here,
  0.22-0.50 over 30 clients — starting at 0.1 would waste about 10 rounds growing C) with the noise multiplier calibrated so the planned
  rounds spend exactly ε (PLD, δ = 1e-5); the non-private run is the same FedAvg without the
  DP stage (example-weighted mean). Why this trade-off: noise on the mean scales as
  z C sqrt(d) / (q N), so with only 1,000 clients the largest cohort the accountant still
  amplifies (q = 0.5) over few rounds gives the least noise per unit of signal; server momentum
  averages the noise of successive rounds.
* Distributed DP (``ddp_eps8``): the same federation, model, cohorts and optimizers, but
  secure aggregation with the distributed discrete Gaussian (Kairouz et al. 2021): every client
  clips its update to C = ``--ddp-clip`` (fixed: adaptive clipping is not implemented for
  distributed DP), rounds it to the integer grid and adds its share of the noise before it is
  masked; every sum carries the noise of at least 450 clients (90 % of the expected cohort;
  rounds with fewer fail). The noise is calibrated so the 40 rounds spend ε = 8 (RDP, δ =
  1e-5) with no amplification by sampling (the coordinator picks the cohort), so it needs about
  twice central DP's noise multiplier. ``ddp_accuracy_eps8`` is compared with DP-FedAvg's
  accuracy at ε = 8 (``ddp_gap_points_eps8``).

Every variant runs in its own process; accuracy is on the 10,000 test images.

    python benchmarks/dp_utility.py            # full size: about 45-60 min on 2 quiet cores
    python benchmarks/dp_utility.py --quick    # tiny sizes, checks that it works (minutes)
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, final_line, machine, run_child  # noqa: E402

DELTA = 1e-5
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel mean and standard deviation


def _task():
    from shoal.data.task_fashion_mnist import fashion_mnist
    task = fashion_mnist(model="cnn")
    for d in (task.train, task.test):  # each load returns private float copies: safe in place
        d.x.sub_(MEAN).div_(STD)
    return task


def _accuracy(model, params, test) -> float:
    import torch.nn.functional as F

    from shoal.metrics import Evaluator
    return Evaluator(model, F.cross_entropy, batch_size=2048)(params, test)["accuracy"]


def sample_level(a: argparse.Namespace) -> dict:
    """DP-SGD on the pooled data: one DPSGD update over all of it."""
    import torch.nn.functional as F

    from shoal import tree
    from shoal.privacy import calibrate_noise_multiplier, dp_sgd, epsilon, tramer_boneh_cnn
    from shoal.types import ClientInfo

    task = _task()
    train = task.train.subset(torch.arange(a.dpsgd_examples)) if a.quick else task.train
    n = len(train)
    torch.manual_seed(0)
    model = tramer_boneh_cnn()
    probe = dp_sgd(model, F.cross_entropy, noise_multiplier=1.0, max_grad_norm=0.1,
                   batch_size=a.dpsgd_batch, epochs=a.dpsgd_epochs)
    z = calibrate_noise_multiplier(3.0, DELTA, probe.steps(n), probe.sampling_rate(n))
    update_fn = dp_sgd(model, F.cross_entropy, noise_multiplier=z, max_grad_norm=0.1,
                       batch_size=a.dpsgd_batch, epochs=a.dpsgd_epochs,
                       optimizer=functools.partial(torch.optim.SGD, lr=4.0, momentum=0.9),
                       grad_sample_mode="hooks")  # 26 k weights: hooks is fastest (0.68 vs
    # 0.80 s CPU per 2,048-example step for book-keeping, measured here)
    params = tree.params_of(model)
    t0 = time.perf_counter()
    result = update_fn(params, train, ClientInfo("pooled", 1, 0))
    final = tree.add(params, result.update)
    return {"accuracy": _accuracy(model, final, task.test),
            "epsilon": epsilon(update_fn.event(n), DELTA), "noise_multiplier": z,
            "steps": update_fn.steps(n), "sampling_rate": update_fn.sampling_rate(n),
            "seconds": time.perf_counter() - t0}


def user_level(a: argparse.Namespace, eps: float | None, distributed: bool = False) -> dict:
    """FedAvg (``eps=None``), DP-FedAvg at ``eps``, or (``distributed``) FedAvg over secure
    aggregation with distributed DP at ``eps``, on the 1,000-client split."""
    import torch.nn.functional as F

    from shoal import tree
    from shoal.aggregate import Pipeline, momentum, weighted_mean
    from shoal.algorithms.cohort import cohort
    from shoal.algorithms.fedavg import FedAvg
    from shoal.callbacks import CentralEvaluation
    from shoal.client import local_sgd
    from shoal.data.federated import federate
    from shoal.privacy import (
        PrivacyAccounting,
        UserLevelLedger,
        calibrate_noise_multiplier,
        dp_fedavg,
        tramer_boneh_cnn,
    )
    from shoal.privacy.budget import DistributedLedger
    from shoal.privacy.distributed import calibrate_distributed, distributed_dp
    from shoal.run import run
    from shoal.secagg import SecureFedAvg, secure_aggregation
    from shoal.sim import InProcessTransport

    task = _task()
    dataset = federate(task, partition="dirichlet", num_clients=a.clients, alpha=0.3, seed=0,
                       eval_fraction=0)
    torch.manual_seed(0)
    model = tramer_boneh_cnn()
    coh = cohort(a.cohort, "poisson")
    update = local_sgd(model, F.cross_entropy, epochs=1, batch_size=16,
                       optimizer=functools.partial(torch.optim.SGD, lr=0.05))
    callbacks = []
    z = 0.0
    min_replies = 1
    if eps is None:
        pipeline = Pipeline()
    elif distributed:
        dim = tree.numel(tree.params_of(model))
        expected = a.cohort * a.clients
        least = max(2, int(0.9 * expected))
        z = calibrate_distributed(eps, DELTA, a.rounds, a.ddp_clip, dim, least, a.clients)
        ddp = distributed_dp(z, a.ddp_clip, dim, least, a.clients)
        pipeline = Pipeline([ddp, secure_aggregation()], weighted_mean("uniform"))
        callbacks.append(PrivacyAccounting(DistributedLedger(ddp), DELTA, target_epsilon=eps))
        min_replies = least
    else:
        z = calibrate_noise_multiplier(eps, DELTA, a.rounds, a.cohort)
        stage = dp_fedavg(z, 0.3, coh, adaptive=True, target_quantile=0.5, clip_lr=0.2)
        pipeline = Pipeline([stage], weighted_mean("uniform"))
        callbacks.append(PrivacyAccounting(UserLevelLedger(z, coh), DELTA, target_epsilon=eps))
    kind = SecureFedAvg if distributed else FedAvg
    fedavg = kind(update, pipeline=pipeline, server_opt=momentum(1.0, 0.9), cohort=coh,
                  min_replies=min_replies, seed=0)
    transport = InProcessTransport(dataset.client_ids(), dataset.client, fedavg.handlers())
    every = max(1, a.rounds // 4)
    callbacks.append(CentralEvaluation(lambda p: {"accuracy": _accuracy(model, p, task.test)},
                                       every=every))
    t0 = time.perf_counter()
    res = run(fedavg, transport, params=tree.params_of(model), rounds=a.rounds,
              callbacks=callbacks)
    last = res.history[-1]
    return {"accuracy": last["central/accuracy"], "epsilon": last.get("dp/epsilon", 0.0),
            "noise_multiplier": z, "rounds": res.rounds, "stopped": res.stopped,
            "clip_norm": last.get("dp/clip_norm", 0.0),
            "curve": [h["central/accuracy"] for h in res.history if "central/accuracy" in h],
            "seconds": time.perf_counter() - t0}


VARIANTS = {"dpsgd": None, "fedavg": None, "dp_eps1": 1.0, "dp_eps3": 3.0, "dp_eps8": 8.0,
            "ddp_eps8": 8.0}


def main() -> None:
    """Parent: run every variant in its own process and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=list(VARIANTS))
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS),
                    help="run only these variants (the figures that need others are skipped)")
    ap.add_argument("--ddp-clip", type=float, default=0.3,
                    help="distributed DP's clipping norm C")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (2 rounds, cohort 0.02, 2,048 examples, 1 epoch)")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--cohort", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--dpsgd-epochs", type=int, default=40)
    ap.add_argument("--dpsgd-batch", type=int, default=2048)
    ap.add_argument("--dpsgd-examples", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.cohort, a.dpsgd_epochs, a.dpsgd_batch = 2, 0.1, 1, 256
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.variant:
        warnings.filterwarnings("ignore")
        emit(sample_level(a) if a.variant == "dpsgd" else
             user_level(a, VARIANTS[a.variant], distributed=a.variant.startswith("ddp")))
        return
    print(f"dp_utility: {machine()}{' (QUICK: tiny sizes, figures meaningless)' if a.quick else ''}",
          flush=True)
    args = [f"--clients={a.clients}", f"--cohort={a.cohort}", f"--rounds={a.rounds}",
            f"--dpsgd-epochs={a.dpsgd_epochs}", f"--dpsgd-batch={a.dpsgd_batch}",
            f"--dpsgd-examples={a.dpsgd_examples}", f"--threads={a.threads}",
            f"--ddp-clip={a.ddp_clip}"]
    args += ["--quick"] if a.quick else []
    out = {}
    for v in a.only or VARIANTS:
        out[v] = run_child(__file__, v, args)
        shown = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in out[v].items()}
        print(f"  {v:<8} {shown}", flush=True)
    figures: dict[str, float] = {}
    if "dpsgd" in out:
        s = out["dpsgd"]
        print(f"sample level: DP-SGD, Tramèr-Boneh CNN, ε = {s['epsilon']:.3f} (δ = {DELTA:g}), "
              f"σ = {s['noise_multiplier']:.3f}, {s['steps']} steps at q = "
              f"{s['sampling_rate']:.4f}: test accuracy {s['accuracy']:.4f}")
        figures["dpsgd_fmnist_accuracy"] = s["accuracy"]
    print(f"user level: {a.clients} clients, Poisson cohort q = {a.cohort}, {a.rounds} rounds, "
          "FedAvgM(1.0, 0.9); DP-FedAvg with adaptive clipping to the median")
    base = out["fedavg"]["accuracy"] if "fedavg" in out else None
    if base is not None:
        print(f"  non-private FedAvg: {base:.4f}")
    for v in ("dp_eps1", "dp_eps3", "dp_eps8", "ddp_eps8"):
        if v not in out:
            continue
        r = out[v]
        gap = f"gap {100 * (base - r['accuracy']):.1f} points; " if base is not None else ""
        what = "distributed DP" if v.startswith("ddp") else "DP-FedAvg"
        print(f"  {what} ε = {VARIANTS[v]:g}: {r['accuracy']:.4f} ({gap}z = "
              f"{r['noise_multiplier']:.3f}, spent ε = {r['epsilon']:.3f}, final C = "
              f"{r['clip_norm']:.4f})")
    if base is not None and "dp_eps8" in out:
        figures["dp_fedavg_gap_points_eps8"] = 100 * (base - out["dp_eps8"]["accuracy"])
    figures.update({f"dp_fedavg_accuracy_eps{int(VARIANTS[v])}": out[v]["accuracy"]
                    for v in ("dp_eps1", "dp_eps3", "dp_eps8") if v in out})
    if "ddp_eps8" in out:
        figures["ddp_accuracy_eps8"] = out["ddp_eps8"]["accuracy"]
        if "dp_eps8" in out:
            figures["ddp_gap_points_eps8"] = 100 * (out["dp_eps8"]["accuracy"]
                                                    - out["ddp_eps8"]["accuracy"])
    final_line(**figures)


if __name__ == "__main__":
    main()
