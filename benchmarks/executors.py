"""How fast each executor simulates a federation, against hand-written PyTorch floors.

* ``--workload W1`` (compute-bound): the Fashion-MNIST CNN workload of ``overhead.py`` (100 IID
  clients, 10 per round, 1 epoch, batch 32, lr 0.05, 20 rounds, central evaluation every round
  in batches of 2048). One variant, ``paired``: ``bare`` (overhead.py's hand-written loop, one
  thread), ``bare_all`` (the same loop with PyTorch's default: every core as intra-op threads),
  ``sequential`` (one thread) and ``auto`` (the executor ``auto`` picks, every core) in one
  process, round by round in turn; ``--variant bare|bare_all|sequential|auto`` runs one alone.
  -> ``speedup_vs_bare_all_threads`` and ``speedup_vs_bare_sequential`` (auto's time vs each
  bare loop, medians over reps of the paired ratios) and ``accuracy_gap_points`` (largest gap
  between auto's and the bare loop's accuracy curves, in points).
* ``--workload W2`` (cross-device): Fashion-MNIST over 1,000 clients (Dirichlet 0.3), MLP
  784-64-10, 100 clients per round, 1 epoch, batch 10, lr 0.05, 50 rounds, central evaluation
  every round. Variants: ``sequential`` on one thread; ``paired``: the ``vectorized`` executor
  on one thread and the ``floor`` (a hand-written loop of batched matrix products over the
  stacked client weights: forward, backward, SGD step, the same averaging and evaluation; no
  framework) in one process, round by round in turn, so that the ratio of the two is measured
  in one run under the same spells of a noisy machine; and ``best`` (``processes`` with a
  vectorized executor in each rank, every core). ``--variant vectorized`` and ``--variant
  floor`` run one of the pair alone. -> rounds per second; ``vectorized_vs_batched_floor`` is
  the median over reps of the paired runs' ratios.
* ``--workload W3`` (population scale): the W2 model and cohort (100 clients of 60 examples,
  vectorized, one thread) drawn from 1,000,000, 10,000 and 1,000 clients; each client is 60
  consecutive rows of one permutation of the pool from its own start (clients overlap;
  ``FederatedDataset.sampled``: a start and a length per client, numbered ids computed on
  demand). Variants: ``pop1m`` and ``pop10k`` (alone: peak resident memory) and ``paired``
  (the three populations in one process, round by round in turn; ``--variant pop1k`` runs the
  smallest alone). -> peak resident memory of the 10,000 and 1,000,000 client runs and the
  median over reps of the paired runs' ratios of median round times to the 1,000 client one.

Setup (data, partition, schedule) happens before the clock starts, and so does one warm-up round
of shoal's runs (it starts worker processes) and of the paired floor; each variant runs in its
own process, alternating, ``--reps`` times; figures are medians.

    python benchmarks/executors.py --workload W2 [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    ShoalJob,
    alternate,
    emit,
    final_line,
    in_turn,
    job_side,
    machine,
    median,
    peak_rss_gib,
    timed_side,
)

SEED = 0
CORES = os.cpu_count() or 1


def _shoal_run(overrides: list[str], rounds: int, threads: int, dataset=None) -> dict:
    """Run FedAvg as ``shoal run`` builds it, timing the rounds (central evaluation included)."""
    job = ShoalJob(overrides, threads, dataset, SEED)
    return job.result(job.rounds(1, rounds))


# -- W1 ----------------------------------------------------------------------------------------

def _w1_job(executor: str) -> ShoalJob:
    """The W1 workload (overhead.py's) with ``executor``: sequential on one thread, ``auto``
    (what it picks: ranks and threads over every core) on every core."""
    import overhead
    base = ["task.name=fashion_mnist", "data.partition=iid",
            f"data.num_clients={overhead.CLIENTS}",
            f"federated.clients_per_round={overhead.PER_ROUND}",
            f"client.batch_size={overhead.BATCH}", f"client.lr={overhead.LR}", "client.epochs=1",
            f"evaluation.batch_size={overhead.EVAL_BATCH}"]
    if executor == "sequential":
        return ShoalJob(base + ["federated.executor=sequential"], 1)
    return ShoalJob(base + [f"federated.executor={executor}"], CORES)


def w1(variant: str, rounds: int) -> dict:
    import overhead
    if variant == "paired":
        return w1_paired(rounds)
    if variant in ("bare", "bare_all"):
        torch.set_num_threads(1 if variant == "bare" else CORES)
        return overhead.bare_variant(rounds)
    job = _w1_job(variant)
    return job.result(job.rounds(1, rounds))


def w1_paired(rounds: int) -> dict:
    """The bare loop on one thread and on every core (PyTorch's default: all cores as
    intra-op threads), the sequential executor (one thread) and the executor ``auto`` picks
    (every core) in one process, round by round in turn (who goes first rotates), each round
    timed; every side runs one warm-up round first."""
    import overhead
    bares = {}
    for name, threads in (("bare", 1), ("bare_all", CORES)):
        torch.set_num_threads(threads)
        bare = overhead.BareLoop(rounds)
        start = bare.glob
        bare.round(1)  # warm-up, as the shoal jobs'
        bare.glob = start
        bares[name] = (bare, threads)
    jobs = {v: _w1_job(v) for v in ("sequential", "auto")}
    curves: dict[str, list[float]] = {name: [] for name in bares}

    def bare_side(name: str):
        bare, threads = bares[name]

        def round_fn(r: int) -> float:
            torch.set_num_threads(threads)
            return bare.round(r)
        return timed_side(round_fn, curves[name])

    seconds = in_turn({**{name: bare_side(name) for name in bares},
                       **{v: job_side(job) for v, job in jobs.items()}}, rounds)
    out = {v: jobs[v].result(seconds[v]) for v in jobs}
    return {"seconds": seconds["auto"], "accuracy": out["auto"]["accuracy"],
            "curve": out["auto"]["curve"], "bare_curve": curves["bare"],
            "bare_all_curve": curves["bare_all"], "seconds_by_variant": seconds,
            "executor": out["auto"]["executor"],
            "speedup_vs_bare_sequential": seconds["bare"] / seconds["auto"],
            "speedup_vs_bare_all_threads": seconds["bare_all"] / seconds["auto"],
            "sequential_vs_bare": seconds["bare"] / seconds["sequential"]}


# -- W2 ----------------------------------------------------------------------------------------

W2 = ["task.name=fashion_mnist", "task.model=mlp", "data.partition=dirichlet", "data.alpha=0.3",
      "data.num_clients=1000", "federated.clients_per_round=100", "client.batch_size=10",
      "client.lr=0.05", "client.epochs=1", "evaluation.batch_size=2048"]


def w2(variant: str, rounds: int) -> dict:
    if variant == "floor":
        return w2_floor(rounds)
    if variant == "paired":
        return w2_paired(rounds)
    if variant in ("sequential", "vectorized"):
        return _shoal_run(W2 + [f"federated.executor={variant}"], rounds, 1)
    return _shoal_run(W2 + ["federated.executor=processes", f"federated.workers={CORES}",
                            "federated.worker_executor=vectorized"], rounds, CORES)


class W2Floor:
    """Hand-written batched SGD for the MLP: the cohort's arithmetic with no framework.

    The schedule (the clients and batches shoal draws, padded) is made before the clock
    starts; :meth:`round` trains one round's cohort with batched matrix products over the
    stacked client weights (forward, backward, SGD step), averages, and evaluates."""

    def __init__(self, rounds: int):
        from shoal.algorithms.cohort import Cohort
        from shoal.config import load_config
        from shoal.data.tasks import load_task
        from shoal.experiment import initial_params, make_dataset, resolve_config
        from shoal.seeding import derive_seed

        torch.set_num_threads(1)
        config = load_config(None, [f"seed={SEED}", "data.eval_fraction=0", *W2])
        task = load_task("fashion_mnist", model="mlp")
        config = resolve_config(config, task)
        dataset = make_dataset(config, task)
        _, params0 = initial_params(config, task)
        self.x = task.train.x.reshape(len(task.train.x), -1)  # (N, 784)
        self.y = task.train.y
        test_x, self.test_y = task.test.tensors()
        self.test_x = test_x.reshape(len(test_x), -1)
        b = self.batch = 10
        ids = dataset.client_ids()
        # The schedule (same clients, same batches as shoal draws), padded: (C, S, B) rows, mask.
        self.schedule = []
        for r in range(1, rounds + 1):
            cohort = Cohort(100).sample(ids, SEED, r)
            plans = []
            for c in cohort:
                rows = dataset.client(c).train.index
                g = torch.Generator().manual_seed(
                    derive_seed(derive_seed(SEED, "client", r, c), "batches"))
                perm = rows[torch.randperm(len(rows), generator=g)]
                steps = -(-len(rows) // b)
                padded = torch.full((steps * b,), -1, dtype=torch.int64)
                padded[:len(rows)] = perm
                plans.append(padded.view(steps, b))
            plans.sort(key=len, reverse=True)
            s_max = len(plans[0])
            idx = torch.full((len(plans), s_max, b), -1, dtype=torch.int64)
            for i, p in enumerate(plans):
                idx[i, :len(p)] = p
            active = [(torch.tensor([len(p) for p in plans]) > s).sum().item()
                      for s in range(s_max)]
            weights = torch.tensor([float((p >= 0).sum()) for p in plans])
            self.schedule.append((idx, active, weights))
        self.params = (params0["1.weight"].t().contiguous(), params0["1.bias"],  # (784, 64)
                       params0["3.weight"].t().contiguous(), params0["3.bias"])

    def round(self, r: int) -> float:
        """Train, average and evaluate round ``r`` (1-based); the test accuracy."""
        idx, active, weights = self.schedule[r - 1]
        x, y, b, lr = self.x, self.y, self.batch, 0.05
        w1g, b1g, w2g, b2g = self.params
        c = idx.shape[0]
        W1, B1 = w1g.expand(c, -1, -1).clone(), b1g.expand(c, -1).clone()
        W2_, B2 = w2g.expand(c, -1, -1).clone(), b2g.expand(c, -1).clone()
        mask = (idx >= 0).float()
        rows = idx.clamp(min=0).transpose(0, 1).contiguous()  # (S, C, B): index_select per step
        for s, k in enumerate(active):
            sel = rows[s, :k].view(-1)
            xb = x.index_select(0, sel).view(k, b, -1)  # (k, B, 784)
            yb, m = y.index_select(0, sel).view(k, b), mask[:k, s]  # (k, B), (k, B)
            h = torch.baddbmm(B1[:k].unsqueeze(1), xb, W1[:k]).clamp_(min=0)  # (k, B, 64)
            logits = torch.baddbmm(B2[:k].unsqueeze(1), h, W2_[:k])  # (k, B, 10)
            d = logits.softmax(-1)
            d.scatter_add_(-1, yb.unsqueeze(-1), -torch.ones_like(d[..., :1]))
            d.mul_((m / m.sum(1, keepdim=True)).unsqueeze(-1))  # d loss / d logits
            dh = torch.bmm(d, W2_[:k].transpose(1, 2)).mul_(h > 0)  # (k, B, 64)
            W2_[:k].baddbmm_(h.transpose(1, 2), d, alpha=-lr)
            B2[:k].sub_(d.sum(1), alpha=lr)
            W1[:k].baddbmm_(xb.transpose(1, 2), dh, alpha=-lr)
            B1[:k].sub_(dh.sum(1), alpha=lr)
        w = weights / weights.sum()
        w1g = w1g + torch.einsum("c,cij->ij", w, W1 - w1g)
        b1g = b1g + w @ (B1 - b1g)
        w2g = w2g + torch.einsum("c,cij->ij", w, W2_ - w2g)
        b2g = b2g + w @ (B2 - b2g)
        self.params = (w1g, b1g, w2g, b2g)
        correct = 0
        test_x, test_y = self.test_x, self.test_y
        for s in range(0, len(test_y), 2048):
            out = (test_x[s:s + 2048] @ w1g + b1g).clamp_(min=0) @ w2g + b2g
            F.cross_entropy(out, test_y[s:s + 2048])
            correct += int((out.argmax(1) == test_y[s:s + 2048]).sum())
        return correct / len(test_y)


def w2_floor(rounds: int) -> dict:
    """The hand-written floor alone (:class:`W2Floor`), every round timed."""
    floor = W2Floor(rounds)
    t0 = time.perf_counter()
    curve = [floor.round(r) for r in range(1, rounds + 1)]
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rounds_per_s": rounds / seconds, "accuracy": curve[-1],
            "curve": curve, "peak_rss_gib": peak_rss_gib()}


def w2_paired(rounds: int) -> dict:
    """The vectorized executor (one thread) and the hand-written floor in one process,
    round by round in turn (which goes first alternates), each round timed: both meet the same
    spells of a noisy machine, so their ratio is measured in one run."""
    job = ShoalJob(W2 + ["federated.executor=vectorized"], 1)
    floor = W2Floor(rounds)
    start = floor.params
    floor.round(1)  # a warm-up round outside the clock for the floor too, as shoal's
    floor.params = start
    curve: list[float] = []
    seconds = in_turn({"vectorized": job_side(job), "floor": timed_side(floor.round, curve)},
                       rounds)
    vec = job.result(seconds["vectorized"])
    return {**vec, "floor_seconds": seconds["floor"], "floor_accuracy": curve[-1],
            "floor_curve": curve, "vectorized_vs_batched_floor":
            seconds["vectorized"] / seconds["floor"]}


# -- W3 ----------------------------------------------------------------------------------------

W3_POPULATIONS = {"pop1m": 1_000_000, "pop10k": 10_000, "pop1k": 1_000}


def _w3_job(clients: int) -> ShoalJob:
    """The W2 model and cohort (vectorized, one thread) drawn from ``clients`` clients."""

    def sampled(config, task):
        # Each client: 60 consecutive rows of one permutation of the pool, from a random start
        # (FederatedDataset.sampled): clients overlap, so any population fits in the same pool,
        # and a client costs a start and a length, its id nothing (ClientIds).
        from shoal.data.federated import FederatedDataset
        return FederatedDataset.sampled(task.train.x, task.train.y, clients, 60, SEED, task.test)

    overrides = [o for o in W2 if not o.startswith(("data.", "federated.clients"))]
    return ShoalJob(overrides + ["federated.clients_per_round=100",
                                  "federated.executor=vectorized"], 1, dataset=sampled)


def w3(variant: str, rounds: int) -> dict:
    if variant == "paired":
        return w3_paired(rounds)
    t0 = time.perf_counter()
    job = _w3_job(W3_POPULATIONS[variant])
    setup = time.perf_counter() - t0
    return {**job.result(job.rounds(1, rounds)), "setup_s": setup}


def w3_paired(rounds: int) -> dict:
    """The three populations in one process, round by round in turn (which goes first
    rotates), so that the ratios of their round times are measured under the same spells of a
    noisy machine."""
    jobs = {v: _w3_job(n) for v, n in W3_POPULATIONS.items()}
    seconds = in_turn({v: job_side(job) for v, job in jobs.items()}, rounds)
    out = {v: jobs[v].result(seconds[v]) for v in jobs}
    small = out["pop1k"]["round_s"]
    return {"seconds": out["pop10k"]["seconds"], "accuracy": out["pop10k"]["accuracy"],
            **{f"round_s_{v}": out[v]["round_s"] for v in out},
            "round_time_ratio": out["pop10k"]["round_s"] / small,
            "round_time_ratio_1m": out["pop1m"]["round_s"] / small}


WORKLOADS = {"W1": (w1, ["paired"], 20),
             "W2": (w2, ["sequential", "paired", "best"], 50),
             "W3": (w3, ["pop1m", "pop10k", "paired"], 20)}


def _per_rep(values: list[float]) -> str:
    return " / ".join(f"{x:.3f}" for x in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=list(WORKLOADS), required=True)
    ap.add_argument("--variant")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 rep: checks it works")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc thresholds at their defaults")
    args = ap.parse_args()
    fn, variants, default_rounds = WORKLOADS[args.workload]
    rounds = args.rounds or (3 if args.quick else default_rounds)
    if args.variant:
        emit(fn(args.variant, rounds))
        return
    reps = 1 if args.quick else args.reps
    if not args.default_malloc:
        # glibc returns freed blocks above 128 KiB to the system and page-faults them back on
        # the next allocation; keeping them (PyTorch's CPU tuning guide suggests the same, or
        # jemalloc/tcmalloc) helps every variant that allocates large tensors per step.
        for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            os.environ.setdefault(name, str(2**32))
    print(f"environment: MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')} "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_')} (every variant)")
    print(f"executors {args.workload}: {machine()}; {reps} reps x {rounds} rounds, alternating")
    runs = alternate(__file__, variants, reps,
                     ["--workload", args.workload, "--rounds", str(rounds)])
    t = {v: median(runs[v], "seconds") for v in variants}
    for v in variants if args.workload != "W1" else ():  # W1 prints its three sides below
        extra = runs[v][0].get("executor", "")
        label = v if v != "paired" else \
            {"W2": "vectorized", "W3": "pop10k"}[args.workload] + " (paired)"
        print(f"  {label:<19} {t[v]:8.2f} s  {rounds / t[v]:7.3f} rounds/s  "
              f"final accuracy {runs[v][0]['accuracy']:.4f}  {extra}")
    if args.workload == "W1":
        paired = runs["paired"]
        for v in ("bare", "bare_all", "sequential", "auto"):
            sec = statistics.median(r["seconds_by_variant"][v] for r in paired)
            print(f"  {v + ' (paired)':<19} {sec:8.2f} s  {rounds / sec:7.3f} rounds/s")
        gap = max(abs(a - b) for a, b in zip(paired[0]["bare_curve"], paired[0]["curve"],
                                             strict=True)) * 100
        seq = [r["speedup_vs_bare_sequential"] for r in paired]
        alls = [r["speedup_vs_bare_all_threads"] for r in paired]
        print(f"  auto chose {paired[0]['executor']}; accuracy curve: "
              f"{[round(a, 4) for a in paired[0]['curve']]}; bare/auto per rep {_per_rep(seq)}; "
              f"bare at {CORES} threads/auto per rep {_per_rep(alls)}")
        final_line(speedup_vs_bare_all_threads=statistics.median(alls),
                   speedup_vs_bare_sequential=statistics.median(seq),
                   accuracy_gap_points=gap, sequential_vs_bare=statistics.median(
                       r["sequential_vs_bare"] for r in paired))
    elif args.workload == "W2":
        floor = median(runs["paired"], "floor_seconds")
        ratios = [r["vectorized_vs_batched_floor"] for r in runs["paired"]]
        print(f"  {'floor (paired)':<19} {floor:8.2f} s  {rounds / floor:7.3f} rounds/s  "
              f"final accuracy {runs['paired'][0]['floor_accuracy']:.4f}  (in the paired runs, "
              "rounds in turn "
              f"with the vectorized executor's; vectorized/floor per rep "
              f"{_per_rep(ratios)})")
        final_line(vectorized_vs_sequential=t["sequential"] / t["paired"],
                   vectorized_vs_batched_floor=statistics.median(ratios),
                   best_vs_sequential=t["sequential"] / t["best"],
                   rounds_per_s=rounds / t["best"])
    else:
        paired = runs["paired"]
        r = {v: median(paired, f"round_s_{v}") for v in W3_POPULATIONS}
        print(f"  median round in the paired runs: {r['pop1m'] * 1e3:.1f} ms (1,000,000 "
              f"clients), {r['pop10k'] * 1e3:.1f} ms (10,000), {r['pop1k'] * 1e3:.1f} ms (1,000); "
              f"per rep 10,000/1,000 {_per_rep([x['round_time_ratio'] for x in paired])}, "
              f"1,000,000/1,000 {_per_rep([x['round_time_ratio_1m'] for x in paired])}; alone: "
              f"{median(runs['pop10k'], 'round_s') * 1e3:.1f} ms (10,000), "
              f"{median(runs['pop1m'], 'round_s') * 1e3:.1f} ms (1,000,000; setup "
              f"{median(runs['pop1m'], 'setup_s'):.1f} s)")
        final_line(peak_rss_gib=median(runs["pop10k"], "peak_rss_gib"),
                   round_time_ratio=statistics.median(x["round_time_ratio"] for x in paired),
                   peak_rss_gib_1m=median(runs["pop1m"], "peak_rss_gib"),
                   round_time_ratio_1m=statistics.median(x["round_time_ratio_1m"]
                                                         for x in paired))


if __name__ == "__main__":
    main()
