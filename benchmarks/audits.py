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

Membership inference (LiRA, Carlini et al. 2022): a model (MLP) trained on a random half of
2,000 Fashion-MNIST images, 10 epochs, plainly and with DP-SGD at ε = 8 (δ = 1e-5); 16 shadow models trained with the
same recipe; ``lira_tpr_*`` is the TPR at 0.1 % FPR (a DP model's must stay under what (ε, δ)
allows, printed beside it).

Canary exposure (Carlini et al. 2019, "The Secret Sharer"): a secret PIN inserted into
a keyboard model's text once (one record: what sample-level DP-SGD protects); its exposure among
all 10^4 PINs, without and with DP-SGD, beside the largest exposure of never-inserted PINs.

The one-run audit (Steinke, Nasr & Jagielski 2023): 1,000 mislabelled canaries, each in the
training set with probability 1/2, DP-SGD at ε = 8; ``eps_lower_bound`` (95 % confidence) must
stay at or below ``eps_accountant`` — a lower bound above the accountant's upper bound is a bug,
and the script says so.

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


POOL = 400        # the one-run audit's ordinary examples (digits)
LIRA_POOL = 2000  # LiRA's candidates: Fashion-MNIST training images, each a member with p 1/2
SHADOWS = 16
EPOCHS = 10
DELTA = 1e-5


def membership(epsilon: float | None, seed: int) -> dict[str, float]:
    """LiRA (online, 16 shadows) against a model trained on a random half of a pool of 2,000
    Fashion-MNIST images (MLP) — plainly (``epsilon=None``) or with DP-SGD calibrated to ``epsilon`` at δ = 1e-5;
    the shadows follow the same recipe (the attacker knows it). TPR at 0.1 % and 1 % FPR, the
    AUC, and the highest TPR at 0.1 % FPR that (ε, δ)-DP allows."""
    import shoal
    from shoal import tree
    from shoal.audits.membership import (
        LiRA,
        epsilon_bound_tpr,
        membership_auc,
        tpr_at_fpr,
    )
    from shoal.client import local_sgd, optimizer_fn
    from shoal.privacy.accounting import calibrate_noise_multiplier
    from shoal.privacy.dpsgd import DPSGD
    from shoal.types import ClientInfo

    task = shoal.load_task("fashion_mnist", model="mlp")
    g = torch.Generator().manual_seed(seed)
    pool = task.train.subset(torch.randperm(len(task.train), generator=g)[:LIRA_POOL])
    x, y = pool.tensors()
    model = task.model_fn()
    batch = 32
    if epsilon is None:
        update = local_sgd(model, task.loss_fn, epochs=EPOCHS, batch_size=batch,
                           optimizer=optimizer_fn("SGD", lr=0.1))
    else:
        rate, steps = batch / (LIRA_POOL // 2), EPOCHS * (LIRA_POOL // 2) // batch
        z = calibrate_noise_multiplier(epsilon, DELTA, steps, rate)
        update = DPSGD(model, task.loss_fn, noise_multiplier=z, max_grad_norm=1.0,
                       batch_size=batch, epochs=EPOCHS, optimizer=optimizer_fn("SGD", lr=0.5))
    params0 = tree.params_of(task.model_fn())

    def train(positions: torch.Tensor, s: int) -> dict[str, torch.Tensor]:
        data = pool.subset(positions)
        result = update(params0, data, ClientInfo("shadow", 1, s, {}))
        return tree.add(params0, result.update)

    lira = LiRA(train, model, (x, y), n_shadows=SHADOWS, seed=seed).fit()
    member = torch.rand(LIRA_POOL, generator=g) < 0.5
    target = train(member.nonzero().flatten(), seed + 10_000)
    scores = lira.scores(target)
    out = {"tpr_0.1%": tpr_at_fpr(scores, member, 0.001), "tpr_1%": tpr_at_fpr(scores, member, 0.01),
           "auc": membership_auc(scores, member)}
    if epsilon is not None:
        out["dp_allows_0.1%"] = epsilon_bound_tpr(0.001, epsilon, DELTA)
    return out


CANARIES = 1000


def one_run(epsilon: float, seed: int) -> tuple[float, float]:
    """An empirical lower bound on ε from one DP-SGD training run (Steinke, Nasr & Jagielski
    2023) beside the accountant's ε: 1,000 canaries (digits examples with random labels), each
    included with probability 1/2 beside 400 ordinary examples, DP-SGD calibrated to
    ``epsilon`` at δ = 1e-5; canaries scored by their negative loss; the best (k+, k-) guess
    with the union bound over the grid, at 95 % confidence."""
    import shoal
    from shoal import tree
    from shoal.audits.epsilon import best_lower_bound, canary_mask
    from shoal.audits.membership import loss_threshold_scores
    from shoal.client import optimizer_fn
    from shoal.data.arrays import ArrayData
    from shoal.privacy.accounting import calibrate_noise_multiplier
    from shoal.privacy.dpsgd import DPSGD
    from shoal.types import ClientInfo

    task = shoal.load_task("digits")
    g = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(task.train), generator=g)
    base = task.train.subset(order[:POOL])
    cx, cy = task.train.subset(order[POOL:POOL + CANARIES]).tensors()
    cy = torch.randint(0, task.num_classes, (CANARIES,), generator=g)  # memorable: mislabelled
    included = canary_mask(CANARIES, seed)
    bx, by = base.tensors()
    x = torch.cat([bx, cx[included]])
    y = torch.cat([by, cy[included]])
    data = ArrayData(x, y, torch.arange(len(y)))
    batch = 64
    rate, steps = batch / len(y), EPOCHS * len(y) // batch
    z = calibrate_noise_multiplier(epsilon, DELTA, steps, rate)
    model = task.model_fn()
    update = DPSGD(model, task.loss_fn, noise_multiplier=z, max_grad_norm=1.0, batch_size=batch,
                   epochs=EPOCHS, optimizer=optimizer_fn("SGD", lr=0.5))
    params0 = tree.params_of(task.model_fn())
    params = tree.add(params0, update(params0, data, ClientInfo("auditee", 1, seed, {})).update)
    scores = loss_threshold_scores(model, params, (cx, cy), loss_fn=task.loss_fn)
    bound = best_lower_bound(scores, included, DELTA, 0.95)
    return bound.epsilon, epsilon


WORDS = ("thou", "art", "more", "lovely", "and", "temperate", "rough", "winds", "do", "shake",
         "the", "darling", "buds", "of", "may", "summer", "lease", "hath", "all", "too", "short",
         "a", "date", "sometime", "eye", "heaven", "shines", "his", "gold", "complexion")
CONTEXT = 8
COPIES = 1           # the secret is one record: what sample-level DP-SGD protects (5 copies are a
                     # group of 5, protected at 5ε: in 2 of 6 runs its exposure left the spread)
EPOCHS_KEYBOARD = 6
FRESH = 32           # never-inserted secrets: their largest exposure is the spread


def canaries(dp: bool, seed: int) -> tuple[float, float]:
    """The Secret Sharer on a keyboard model (Carlini et al. 2019): a next-character model over
    8-character contexts (embedding, one hidden layer), trained on 3,000 words of text with
    numbers in it, into which ``my pin is DDDD`` was inserted once; exposure of that secret
    among all 10^4 (exact rank), and the largest exposure of 32 never-inserted secrets of the
    same format (the spread a model shows without memorising). Plain training (Adam) or DP-SGD
    (σ = 1, clip 1) for the same 6 epochs."""
    import string

    import torch.nn.functional as F
    from torch import nn

    from shoal import tree
    from shoal.audits.canary import encode, exposure, insert, make_canary
    from shoal.client import local_sgd, optimizer_fn
    from shoal.data.arrays import ArrayData
    from shoal.privacy.dpsgd import DPSGD
    from shoal.types import ClientInfo

    vocab = string.ascii_lowercase + string.digits + " "
    g = torch.Generator().manual_seed(seed)
    words = []
    for _ in range(3000):
        if torch.rand(1, generator=g) < 0.15:
            words.append("".join(str(int(d)) for d in torch.randint(0, 10, (3,), generator=g)))
        else:
            words.append(WORDS[int(torch.randint(0, len(WORDS), (1,), generator=g))])
    ids = encode(" ".join(words), vocab)
    x = ids.unfold(0, CONTEXT, 1)[:-1]  # (n, CONTEXT) contexts
    y = ids[CONTEXT:]                   # (n,) next characters
    secret = make_canary("my pin is ", string.digits, 4, seed)
    x, y = insert((x, y), secret, COPIES, vocab=vocab, seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(len(vocab), 16), nn.Flatten(),
                          nn.Linear(16 * CONTEXT, 128), nn.ReLU(), nn.Linear(128, len(vocab)))
    opt = optimizer_fn("Adam", lr=5e-3)
    if dp:
        update = DPSGD(model, F.cross_entropy, noise_multiplier=1.0, max_grad_norm=1.0,
                       batch_size=64, epochs=EPOCHS_KEYBOARD, optimizer=opt)
    else:
        update = local_sgd(model, F.cross_entropy, epochs=EPOCHS_KEYBOARD, batch_size=64,
                           optimizer=opt)
    params0 = tree.params_of(model)
    data = ArrayData(x, y, torch.arange(len(y)))
    params = tree.add(params0, update(params0, data, ClientInfo("phone", 1, seed, {})).update)
    inserted = exposure(model, params, secret, vocab=vocab, context=CONTEXT)
    fresh = max(exposure(model, params, make_canary("my pin is ", string.digits, 4, seed + s),
                         vocab=vocab, context=CONTEXT) for s in range(1, FRESH + 1))
    return inserted, fresh


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
    for name, eps in (("nodp", None), ("dp_eps8", 8.0)):
        t0 = time.perf_counter()
        m = membership(eps, args.seed)
        figures[f"lira_tpr_{name}"] = m["tpr_0.1%"]
        extra = (f"; (ε = 8, δ = {DELTA:g}) allows at most {m['dp_allows_0.1%']:.4f}"
                 if eps is not None else "")
        print(f"LiRA ({SHADOWS} shadows, {LIRA_POOL} Fashion-MNIST candidates, {EPOCHS} epochs), "
              f"{'no DP' if eps is None else 'DP-SGD at ε = 8'}: TPR {m['tpr_0.1%']:.4f} at "
              f"0.1 % FPR, {m['tpr_1%']:.4f} at 1 %, AUC {m['auc']:.4f}{extra} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for name, dp in (("nodp", False), ("dp", True)):
        t0 = time.perf_counter()
        inserted, fresh = canaries(dp, args.seed)
        figures[f"canary_exposure_{name}"] = inserted
        print(f"canary exposure, {'DP-SGD (σ = 1)' if dp else 'no DP'}: inserted secret "
              f"{inserted:.2f} bits of log2(10^4) = 13.29; never-inserted secrets up to "
              f"{fresh:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    figures["eps_lower_bound"], figures["eps_accountant"] = one_run(8.0, args.seed)
    verdict = ("consistent" if figures["eps_lower_bound"] <= figures["eps_accountant"] else
               "ABOVE THE ACCOUNTANT'S UPPER BOUND: a bug in the accounting or the mechanism")
    print(f"one-run audit ({CANARIES} canaries, DP-SGD at ε = 8): empirical lower bound "
          f"{figures['eps_lower_bound']:.4f} vs accountant {figures['eps_accountant']:g}: "
          f"{verdict} ({time.perf_counter() - t0:.0f} s)", flush=True)
    final_line(**figures)


if __name__ == "__main__":
    main()
