"""Data-parallel throughput: samples per second with 1 and 2 workers (torch.distributed, gloo).

Workload (issue "real deployment"): Fashion-MNIST's CNN (the task's default model), batch 32
per worker, synchronous DDP, SGD lr 0.05; each variant runs ``--rounds`` rounds of
``--steps`` steps in its own process tree, and samples per second is measured inside the
training loop of the rounds after the first (warm-up, process start and data loading excluded).
With N workers each step processes N x 32 samples. ``scaling_efficiency`` = samples/s with 2
workers / (2 x samples/s with 1 worker); on a machine with fewer free cores than workers it
measures contention, not the method.

    python benchmarks/data_parallel.py [--quick] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, emit, final_line, machine, median  # noqa: E402


def variant(workers: int, rounds: int, steps: int, task: str) -> dict:
    import torch

    from shoal.config import load_config
    from shoal.data.tasks import load_task
    from shoal.data_parallel import DataParallel
    from shoal.experiment import initial_params, resolve_config

    torch.set_num_threads(1)
    options = ["task.hidden=32"] if task == "digits" else []
    config = load_config(None, [f"task.name={task}", *options, "data.partition=iid",
                                "data.num_clients=10", "client.batch_size=32", "client.lr=0.05",
                                "paradigm=data_parallel", f"data_parallel.workers={workers}",
                                f"data_parallel.steps_per_round={steps}"])
    t = load_task(config.task.name, **config.task.options)
    config = resolve_config(config, t)
    _, params0 = initial_params(config, t)
    algorithm = DataParallel(config)
    state = algorithm.init(params0)
    rates = []
    try:
        for r in range(1, rounds + 1):
            state, report = algorithm.round(state, None, r)  # type: ignore[arg-type]
            rates.append(report.metrics["data_parallel/samples_per_s"])
    finally:
        algorithm.close()
    return {"samples_per_s": statistics.median(rates[1:] or rates)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="digits MLP, few steps")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--task", default="fashion_mnist")
    ap.add_argument("--variant")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.rounds, args.steps, args.task = 1, 3, 10, "digits"
    if args.variant:
        emit(variant(int(args.variant.removeprefix("w")), args.rounds, args.steps, args.task))
        return
    print(f"data parallel: {args.task}, batch 32 per worker, {args.rounds} rounds x "
          f"{args.steps} steps; {machine()}")
    runs = alternate(__file__, ["w1", "w2"], args.reps,
                     ["--rounds", str(args.rounds), "--steps", str(args.steps),
                      "--task", args.task])
    one, two = median(runs["w1"], "samples_per_s"), median(runs["w2"], "samples_per_s")
    print(f"samples/s: 1 worker {one:.1f}, 2 workers {two:.1f}")
    final_line(scaling_efficiency=two / (2 * one))


if __name__ == "__main__":
    main()
