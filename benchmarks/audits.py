"""Gradient inversion by an honest-but-curious coordinator (digits, 10 one-example clients).

The federation: the built-in digits task (64 features; an MLP whose first layer is
``nn.Linear(64, 128)`` with a bias), 10 clients that each hold ONE training example (drawn from
the training split with the run's seed), every client sampled, one round, one local step of
plain SGD (``client.batch_size=1``, ``client.max_steps=1``, ``client.epochs=1``, lr 0.1, no
momentum). The algorithm and the simulated transport are the ones ``shoal run`` builds
(:func:`shoal.experiment.build_federated`); the coordinator's view is every message it sends or
receives, captured by a :class:`shoal.observe.Recorder` on the transport.

From what it recorded the coordinator runs the analytic attack
(:func:`shoal.audits.inversion.analytic_recovery` on the first layer: ``x = dL/dW[i] /
dL/db[i]``) on every update-shaped thing it holds, and a client counts as recovered when ANY
recovered vector equals its example (:func:`~shoal.audits.inversion.exact_recovery`,
``max |x_hat - x| <= 1e-4``). ``dlg_exact_*`` is the fraction of the 10 clients recovered; the
mean reconstruction error is, per client, the smallest MSE over the coordinator's candidates,
averaged over the clients; for scale, the script also prints the error of guessing the training
set's mean image.

* ``plain``: FedAvg; candidates: each client's update (kind ``"train"`` replies).
* ``dp``: the same with DP-SGD on every client (``privacy.mode="sample"``, noise multiplier
  1.0, clip norm 1.0).
* ``secagg``: SecureFedAvg (``secagg.enabled=true``, SecAgg+); the coordinator receives only
  masked, quantized inputs (kind ``secagg.masked_input``) and learns the unmasked sum.
  Candidates: each masked input decoded as if it were unmasked (dequantized with the session's
  levels and clip, reshaped into the params), and the aggregate update the round applied
  (new params - old params, the decoded sum over the total weight).
  The plain and DP cases also try the aggregate update, so every case gives the attacker the
  same extra candidate.

    python benchmarks/audits.py [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import final_line, machine  # noqa: E402

CLIENTS = 10
TOL = 1e-4
BASE = ["task.name=digits", "baseline=false", "data.eval_fraction=0",
        f"data.num_clients={CLIENTS}", f"federated.clients_per_round={CLIENTS}",
        "federated.rounds=1", "client.batch_size=1", "client.max_steps=1", "client.epochs=1",
        "client.optimizer=SGD", "client.lr=0.1", "client.momentum=0",
        "evaluation.federated_every=0"]
CASES = {
    "plain": [],
    "dp": ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"],
    "secagg": ["secagg.enabled=true"],
}


def one_example_clients(task, seed: int):
    """A federation of ``CLIENTS`` clients, each holding one training example of ``task``."""
    from shoal.data.federated import FederatedDataset

    train = task.train
    rng = np.random.default_rng(seed)
    rows = train.index[torch.from_numpy(rng.choice(len(train), CLIENTS, replace=False))]
    ids = [f"client-{i:03d}" for i in range(CLIENTS)]
    clients = {cid: (rows[i:i + 1].clone(), None) for i, cid in enumerate(ids)}
    data = FederatedDataset(train.x, train.y, clients, test=task.test,
                            info={"partition": "one example each", "seed": seed})
    truth = {cid: train.x[rows[i]].detach().clone() for i, cid in enumerate(ids)}
    return data, truth


def decode_masked(masked: torch.Tensor, levels: int, clip: float, template):
    """A masked input read as if it were a client's plain quantized input (the update block of
    ``SecureFedAvg.train_input`` back into the params' shapes)."""
    from shoal import tree
    from shoal.secagg.quantize import dequantize

    flat, spec = tree.flatten(template)
    n = flat.numel()
    ring = masked.detach().numpy().view(np.uint32)
    (wx, *_rest) = dequantize(ring, [(n, clip), (ring.shape[0] - n, 1.0)], levels)
    return tree.unflatten(torch.from_numpy(wx), [(k, s, torch.float64) for k, s, _ in spec])


def attack(case: str, seed: int) -> dict:
    """Run one round of ``case``; the coordinator's analytic attack on what it recorded."""
    import shoal
    from shoal.audits.inversion import (
        analytic_recovery,
        exact_recovery,
        reconstruction_error,
        update_to_gradient,
    )
    from shoal.experiment import build_federated, initial_params, resolve_config
    from shoal.message import COORDINATOR
    from shoal.observe import Recorder
    from shoal.run import run
    from shoal.secagg.protocol import MASKED_INPUT

    config = shoal.load_config(None, [*BASE, f"seed={seed}", *CASES[case]])
    task = shoal.load_task(config.task.name, **config.task.options)
    config = resolve_config(config, task, quiet=True)
    data, truth = one_example_clients(task, seed)
    model, params0 = initial_params(config, task)
    algorithm, transport = build_federated(config, task, data, model)
    lr = config.client.lr
    t0 = time.perf_counter()
    with transport:
        coordinator = transport.observe(Recorder(COORDINATOR))
        res = run(algorithm, transport, rounds=1, params=params0)
    seconds = time.perf_counter() - t0
    if res.history and res.history[-1].get("round/replied", CLIENTS) != CLIENTS:
        raise SystemExit(f"{case}: only {res.history[-1]['round/replied']} of {CLIENTS} "
                         "clients replied")

    candidates: list[tuple[str, torch.Tensor | None]] = []
    received = coordinator.received
    if case == "secagg":
        asked = {m.dst: m for m in coordinator.sent if m.kind == MASKED_INPUT}
        masked = [m for m in received if m.kind == MASKED_INPUT]
        assert len(masked) == CLIENTS, f"{len(masked)} masked inputs"
        assert not any(m.kind == "train" for m in coordinator), "a plain update crossed"
        for m in masked:
            cfg = asked[m.src].config
            update = decode_masked(m.tensors["masked"], int(cfg["levels"]),
                                   float(cfg["clip"]), params0)
            candidates.append((f"masked:{m.src}", analytic_recovery(update, "0")))
    else:
        updates = [m for m in received if m.kind == "train"]
        assert len(updates) == CLIENTS, f"{len(updates)} updates"
        for m in updates:
            grads = update_to_gradient({k: m.tensors[k] for k in params0}, lr=lr)
            candidates.append((f"update:{m.src}", analytic_recovery(grads, "0")))
    new = res.state.params
    aggregate = {k: new[k].detach().double() - params0[k].detach().double() for k in params0}
    candidates.append(("aggregate", analytic_recovery(aggregate, "0")))

    recovered, errors, own = 0, [], 0
    for cid, x in truth.items():
        hits = [label for label, x_hat in candidates if exact_recovery(x_hat, x, TOL)]
        recovered += bool(hits)
        own += any(h.endswith(f":{cid}") for h in hits)
        errors.append(min((reconstruction_error(x_hat, x) for _, x_hat in candidates
                           if x_hat is not None), default=float("inf")))
    return {"exact": recovered / CLIENTS, "own": own / CLIENTS,
            "error": statistics.fmean(errors), "candidates": len(candidates),
            "none": sum(x_hat is None for _, x_hat in candidates), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine(), flush=True)
    print(f"digits, {CLIENTS} clients of one example, 1 round, 1 SGD step (lr 0.1), "
          f"exact = max |x_hat - x| <= {TOL:g}", flush=True)
    import shoal
    from shoal.audits.inversion import reconstruction_error

    task = shoal.load_task("digits")
    _, truth = one_example_clients(task, args.seed)
    pool = task.train.x[task.train.index]
    guess = statistics.fmean(reconstruction_error(pool.mean(0), x) for x in truth.values())
    print(f"reference: guessing the training set's mean image gives a mean reconstruction "
          f"error of {guess:.4g} (pixels in [0, 1])", flush=True)
    figures: dict[str, float] = {}
    for case in CASES:
        r = attack(case, args.seed)
        figures[f"dlg_exact_{case}"] = r["exact"]
        print(f"{case:<7} recovered {r['exact']:.2f} of clients (from their own message "
              f"{r['own']:.2f}), mean reconstruction error {r['error']:.4g}; "
              f"{r['candidates']} candidates ({r['none']} without a bias gradient), "
              f"round {r['seconds']:.1f} s", flush=True)
    final_line(**figures)


if __name__ == "__main__":
    main()
