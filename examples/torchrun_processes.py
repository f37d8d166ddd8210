"""A simulated federation on several machines: the ``processes`` executor under ``torchrun``.

Every rank runs this same file and builds the same federation from the same config and seed
(the data are read locally on each machine; only params and updates travel). Rank 0 runs the
rounds and evaluates; the other ranks train their share of each round's cohort and send one
summed update per round (gloo on CPU; on machines with a GPU per rank the sums are reduced
with NCCL, see ``shoal.sim.processes.backend``).

One machine, two ranks::

    torchrun --standalone --nproc-per-node 2 examples/torchrun_processes.py

Two machines (run on both; HOST is machine A's address, reachable from B)::

    # machine A                                  # machine B
    torchrun --nnodes 2 --node-rank 0 \\         torchrun --nnodes 2 --node-rank 1 \\
      --nproc-per-node 2 \\                        --nproc-per-node 2 \\
      --master-addr HOST --master-port 29500 \\    --master-addr HOST --master-port 29500 \\
      examples/torchrun_processes.py               examples/torchrun_processes.py

Options after the file name are ``key=value`` config overrides, e.g. ``federated.rounds=5``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from shoal.callbacks import CentralEvaluation
from shoal.config import load_config
from shoal.data.tasks import load_task
from shoal.experiment import build_federated, initial_params, make_dataset, resolve_config
from shoal.metrics import Evaluator
from shoal.run import run
from shoal.sim.processes import backend, serve


def main() -> None:
    config = load_config(None, ["task.name=digits", "federated.rounds=10", "baseline=false",
                                "federated.executor=processes", *sys.argv[1:]])
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks on this machine
    dist.init_process_group(backend(local_ranks, config.federated.worker_executor))
    rank = dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    task = load_task(config.task.name, **config.task.options)
    config = resolve_config(config, task)
    dataset = make_dataset(config, task)
    model, params0 = initial_params(config, task)
    algorithm, transport = build_federated(config, task, dataset, model)
    if rank != 0:
        serve(transport, config.federated.worker_executor)  # until rank 0 closes
    else:
        evaluator = Evaluator(model, task.loss_fn)
        result = run(algorithm, transport, rounds=config.federated.rounds, params=params0,
                     callbacks=[CentralEvaluation(lambda p: evaluator(p, task.test))])
        transport.close()  # tells the other ranks to return from serve()
        print(f"{dist.get_world_size()} ranks, {result.rounds} rounds: central accuracy "
              f"{result.history[-1]['central/accuracy']:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
