"""What shoal costs over a bare PyTorch loop that does the identical arithmetic.

Workload (issue "federated core"): Fashion-MNIST, the CNN of McMahan et al. 2017 (1.66 M
parameters), 100 IID clients, 10 per round, 1 local epoch, batch 32, SGD lr 0.05, 20 rounds,
central evaluation on the 10,000 test images after every round.

* ``shoal``: the path ``shoal run`` takes — FedAvg, the in-process transport, the run loop with
  central evaluation, the metrics log and a checkpoint after every round.
* ``bare``: a hand-written loop over the same clients, the same batches (same permutations),
  the same delta-averaging arithmetic in the same order and the same evaluation batches.

Setup (loading the data, partitioning, drawing the schedule) and one warm-up round are done by
both before the clock starts. The time ratio is measured *paired*: both run in one process,
round by round in turn (which goes first rotates), every round timed, so both meet the same
spells of a shared machine; ``overhead_ratio`` is the median over ``--reps`` of each paired
run's ratio. Peak memory needs a process of its own: each side then runs alone for
``--memory-rounds`` rounds, alternating. The final parameters of both are compared bit for bit.

    python benchmarks/overhead.py [--reps 3] [--rounds 20] [--memory-rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
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
CLIENTS, PER_ROUND, BATCH, LR, EVAL_BATCH = 100, 10, 32, 0.05, 2048


def _overrides(rounds: int) -> list[str]:
    return ["task.name=fashion_mnist", "data.partition=iid", f"data.num_clients={CLIENTS}",
            "data.eval_fraction=0", f"federated.rounds={rounds}",
            f"federated.clients_per_round={PER_ROUND}", f"client.batch_size={BATCH}",
            f"client.lr={LR}", "client.epochs=1", f"seed={SEED}", "baseline=false",
            f"evaluation.batch_size={EVAL_BATCH}"]


def _config(rounds: int):
    from shoal.config import load_config
    return load_config(None, _overrides(rounds))


def _digest(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(params[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def shoal_variant(rounds: int) -> dict:
    from shoal.callbacks import CentralEvaluation, MetricsLog
    from shoal.checkpoint import Checkpoint
    from shoal.data.tasks import load_task
    from shoal.experiment import build_federated, initial_params, make_dataset, resolve_config
    from shoal.metrics import Evaluator
    from shoal.run import run

    config = _config(rounds)
    task = load_task("fashion_mnist")
    config = resolve_config(config, task)
    dataset = make_dataset(config, task)
    model, params0 = initial_params(config, task)
    algorithm, transport = build_federated(config, task, dataset, model)
    evaluator = Evaluator(model, task.loss_fn, batch_size=EVAL_BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [CentralEvaluation(lambda p: evaluator(p, task.test)),
                     MetricsLog(Path(tmp) / "metrics.jsonl"), Checkpoint(Path(tmp) / "ckpt")]
        t0 = time.perf_counter()
        res = run(algorithm, transport, rounds=rounds, params=params0, callbacks=callbacks)
        seconds = time.perf_counter() - t0
    curve = [h["central/accuracy"] for h in res.history]
    return {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "accuracy": curve[-1],
            "curve": curve, "digest": _digest(res.state.params)}


class BareLoop:
    """The bare PyTorch loop: set up with shoal's data loading and seeds (so both variants see
    the same clients, batches and initial weights), then :meth:`round` uses only PyTorch."""

    def __init__(self, rounds: int):
        from shoal.algorithms.cohort import Cohort
        from shoal.data.tasks import load_task
        from shoal.experiment import initial_params, make_dataset, resolve_config
        from shoal.seeding import derive_seed

        config = _config(rounds)
        task = load_task("fashion_mnist")
        config = resolve_config(config, task)
        dataset = make_dataset(config, task)
        self.model, _ = initial_params(config, task)
        ids = dataset.client_ids()
        self.schedule = []
        for r in range(1, rounds + 1):
            cohort = Cohort(PER_ROUND).sample(ids, SEED, r)
            self.schedule.append([(dataset.client(c).train.index,
                                   derive_seed(derive_seed(SEED, "client", r, c), "batches"))
                                  for c in cohort])
        self.x, self.y = task.train.x, task.train.y
        self.test_x, self.test_y = task.test.tensors()
        self.names = [k for k, v in self.model.state_dict().items() if v.is_floating_point()]
        self.live = self.model.state_dict(keep_vars=True)
        self.glob = {k: self.live[k].detach().clone() for k in self.names}

    def round(self, r: int) -> float:
        """Train, average and evaluate round ``r`` (1-based); the test accuracy."""
        model, live, names, x, y = self.model, self.live, self.names, self.x, self.y
        glob = self.glob
        acc: dict[str, torch.Tensor] = {}
        total = 0.0
        for rows, batch_seed in self.schedule[r - 1]:
            with torch.no_grad():
                for k in names:
                    live[k].copy_(glob[k])
            model.train()
            opt = torch.optim.SGD([p for p in model.parameters()], lr=LR)
            order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(
                batch_seed))]
            for s in range(0, len(order), BATCH):
                sel = order[s:s + BATCH]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x.index_select(0, sel)), y.index_select(0, sel)).backward()
                opt.step()
            w = float(len(rows))
            for k in names:
                delta = live[k].detach() - glob[k]
                if k in acc:
                    acc[k].add_(delta, alpha=w)
                else:
                    acc[k] = delta * w
            total += w
        glob = self.glob = {k: glob[k] + 1.0 * (acc[k] / total) for k in names}
        with torch.no_grad():
            for k in names:
                live[k].copy_(glob[k])
        model.eval()
        correct = 0
        test_x, test_y = self.test_x, self.test_y
        with torch.inference_mode():
            for s in range(0, len(test_y), EVAL_BATCH):
                out = model(test_x[s:s + EVAL_BATCH])
                F.cross_entropy(out, test_y[s:s + EVAL_BATCH])
                correct += int((out.argmax(1) == test_y[s:s + EVAL_BATCH]).sum())
        return correct / len(test_y)


def bare_variant(rounds: int) -> dict:
    bare = BareLoop(rounds)
    t0 = time.perf_counter()
    curve = [bare.round(r) for r in range(1, rounds + 1)]
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "accuracy": curve[-1],
            "curve": curve, "digest": _digest(bare.glob)}


def paired_variant(rounds: int) -> dict:
    """Both sides in one process, round by round in turn, each round timed; shoal's side is
    the ``shoal run`` path of :func:`shoal_variant` (metrics log and checkpoint every round)."""
    bare = BareLoop(rounds)
    start = bare.glob
    bare.round(1)  # a warm-up round outside the clock, as shoal's job runs one
    bare.glob = start
    curve: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        job = ShoalJob(_overrides(rounds), torch.get_num_threads(), seed=SEED, logs=tmp)
        seconds = in_turn({"bare": timed_side(bare.round, curve), "shoal": job_side(job)},
                          rounds)
        shoal = job.result(seconds["shoal"])
    return {"seconds": seconds["shoal"], "bare_seconds": seconds["bare"],
            "overhead_ratio": seconds["shoal"] / seconds["bare"],
            "accuracy": shoal["accuracy"], "bare_accuracy": curve[-1], "curve": shoal["curve"],
            "digest": _digest(job.state.params), "bare_digest": _digest(bare.glob)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["paired", "shoal", "bare"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--memory-rounds", type=int, default=3)
    args = ap.parse_args()
    if args.variant:
        fn = {"paired": paired_variant, "shoal": shoal_variant, "bare": bare_variant}
        emit(fn[args.variant](args.rounds))
        return
    print(f"overhead: {machine()}; {args.reps} paired reps x {args.rounds} rounds; memory: "
          f"each side alone, {args.memory_rounds} rounds")
    runs = alternate(__file__, ["paired"], args.reps, ["--rounds", str(args.rounds)])["paired"]
    mem = alternate(__file__, ["bare", "shoal"], 1, ["--rounds", str(args.memory_rounds)])
    ratios = [r["overhead_ratio"] for r in runs]
    bare_m, shoal_m = median(mem["bare"], "peak_rss_gib"), median(mem["shoal"], "peak_rss_gib")
    same = all(r["digest"] == r["bare_digest"] for r in runs)
    print(f"accuracy curve (shoal): {[round(a, 4) for a in runs[0]['curve']]}")
    print(f"paired per rep: bare {[round(r['bare_seconds'], 1) for r in runs]} s, shoal "
          f"{[round(r['seconds'], 1) for r in runs]} s, shoal/bare "
          f"{' / '.join(f'{x:.3f}' for x in ratios)}; peak RSS: bare {bare_m:.3f} GiB, shoal "
          f"{shoal_m:.3f} GiB; final parameters bit-identical: {same}")
    acc_s, acc_b = runs[0]["accuracy"], runs[0]["bare_accuracy"]
    final_line(overhead_ratio=statistics.median(ratios), memory_ratio=shoal_m / bare_m,
               accuracy_gap_points=abs(acc_s - acc_b) * 100, shoal_accuracy=acc_s)


if __name__ == "__main__":
    main()
