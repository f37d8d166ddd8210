"""Data-parallel training on ``torch.distributed``: the seeds' classic distributed learning.

The pooled training set is sharded across ``workers`` processes that train one model
synchronously with ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU): every step, each
worker takes its slice of a global batch (``workers x batch_size`` rows of one shuffled order
drawn from the seed and the round), and DDP averages the gradients, so N workers compute the
same step as one worker on the combined batch. With ``local_steps = H > 0`` the workers step
on their own and average their models every H steps instead (local SGD, the bridge to federated
averaging: H = one round's steps is FedAvg with IID clients).

Launch:

* ``shoal run`` with ``paradigm = "data_parallel"`` and ``[data_parallel] workers = N``: rank 0
  is the ``shoal run`` process (it runs the loop, evaluation and checkpoints), ranks 1..N-1
  are spawned locally;
* across machines with ``torchrun``: ``torchrun --nnodes M --nproc-per-node K
  --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m shoal data-parallel CONFIG --out DIR``;
  rank 0 runs the experiment, the other ranks serve it.

A round is one pass over the pooled data (or ``steps_per_round`` steps). Each round starts by
broadcasting rank 0's params, so a resumed run continues from its checkpoint; the torch
optimizer is rebuilt each round (its state, e.g. momentum, does not persist across rounds).

Costs: every collective a rank takes part in is counted by the bytes of the tensor it hands to
it (DDP's gradient buckets through a communication hook, the model averages of local SGD, the
round's broadcast of the params and the loss), reported per round as
``data_parallel/collective_bytes`` (per rank). What all ranks together put on the wire for those
collectives — ``2 (W - 1) S`` for an all-reduce of ``S`` bytes over ``W`` ranks (the ring
algorithm's volume), ``(W - 1) S`` for a broadcast — is counted on the ring's links
``rank-r -> rank-(r+1)``, an equal share each, so ``comm/bytes_peer`` and the per-participant
costs of ``summary.json`` hold it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from . import tree
from .algorithm import RoundReport
from .client import LossFn, OptimizerFn
from .config import Config, parse_config, to_dict
from .data.arrays import ArrayData
from .errors import ConfigError, WorkerError
from .experiment import (
    Built,
    Setup,
    client_optimizer,
    initial_params,
    make_dataset,
    register_paradigm,
    resolve_config,
)
from .node import Handler
from .seeding import torch_generator
from .transport import FunctionTransport, Transport
from .tree import Params
from .workers import GUARD_FIX, Workers, report_started, watch_parent

__all__ = ["COLLECTIVE", "DataParallel", "DataParallelState", "Trainer", "data_parallel_paradigm",
           "main", "serve_rank"]

log = logging.getLogger(__name__)

_STOP, _ROUND = 0, 1

COLLECTIVE = "data_parallel.collective"
"""The kind under which the ranks' collectives are counted in the traffic statistics."""


@dataclass
class DataParallelState:
    """The model's params after the last completed round."""

    params: Params


def _backend(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    return name


class Trainer:
    """One rank's training: its shard of each global batch, DDP or local SGD.

    Every rank holds the same ``data`` (the pooled training set) and draws the same shuffled
    order; rank ``r`` of ``world`` trains on rows ``[r*B, (r+1)*B)`` of each global batch.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: ArrayData, *, batch_size: int,
                 optimizer: OptimizerFn, seed: int, local_steps: int = 0,
                 steps_per_round: int = 0):
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = (torch.device("cuda", self.rank % torch.cuda.device_count())
                       if dist.get_backend() == "nccl" else torch.device("cpu"))
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.data = data
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.seed = seed
        self.local_steps = local_steps
        self.global_batch = batch_size * self.world
        self.steps = steps_per_round or max(1, len(data) // self.global_batch)
        self.allreduced = 0  # bytes this rank handed to all-reduces (this round)
        self.broadcast = 0  # bytes broadcast from rank 0 (this round)
        if local_steps:
            self.net: nn.Module = self.model
        else:
            ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            ddp.register_comm_hook(self, _counting_allreduce)
            self.net = ddp

    def wire_bytes(self) -> float:
        """The round's bytes on the wire of all ranks together (see the module docstring)."""
        w = self.world
        return float(2 * (w - 1) * self.allreduced + (w - 1) * self.broadcast)

    def _average(self) -> None:
        with torch.no_grad():
            for t in self.model.state_dict().values():
                if t.is_floating_point():
                    self.allreduced += t.numel() * t.element_size()
                    dist.all_reduce(t, op=dist.ReduceOp.SUM)
                    t.div_(self.world)

    def train_round(self, round: int, params: Params | None) -> tuple[Params, dict[str, float]]:
        """Train one round from rank 0's ``params``; returns the params and the metrics."""
        state = self.model.state_dict()
        self.allreduced = self.broadcast = 0
        with torch.no_grad():
            for k, t in state.items():
                if self.rank == 0 and params is not None:
                    t.copy_(params[k])
                dist.broadcast(t, 0)
                self.broadcast += t.numel() * t.element_size()
        self.model.train()
        opt = self.optimizer([p for p in self.model.parameters() if p.requires_grad])
        n = len(self.data)
        order = torch.randperm(n, generator=torch_generator(self.seed, "data_parallel", round))
        loss_sum = torch.zeros((), dtype=torch.float64)
        start = time.perf_counter()
        for step in range(self.steps):
            lo = step * self.global_batch + self.rank * self.batch_size
            pos = order[torch.arange(lo, lo + self.batch_size) % n]
            rows = self.data.index[pos]
            xb = self.data.x[rows].to(self.device)
            yb = self.data.y[rows].to(self.device)
            opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.net(xb), yb)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().double().cpu()
            if self.local_steps and (step + 1) % self.local_steps == 0:
                self._average()
        if self.local_steps and self.steps % self.local_steps:
            self._average()
        seconds = time.perf_counter() - start
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        self.allreduced += loss_sum.numel() * loss_sum.element_size()
        examples = float(self.steps * self.global_batch)
        metrics = {"train/loss": float(loss_sum) / (self.steps * self.world),
                   "train/steps": float(self.steps), "train/examples": examples,
                   "data_parallel/workers": float(self.world),
                   "data_parallel/samples_per_s": examples / seconds,
                   "data_parallel/collective_bytes": float(self.allreduced + self.broadcast)}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}, metrics


def _counting_allreduce(trainer, bucket):
    """DDP's default all-reduce of a gradient bucket (the mean over ranks), counting its
    bytes. (``bucket`` is a ``dist.GradBucket``, the result a ``torch.futures.Future``; DDP
    refuses a hook whose annotations are strings, as postponed annotations make them.)"""
    buf = bucket.buffer()
    trainer.allreduced += buf.numel() * buf.element_size()
    return default_hooks.allreduce_hook(None, bucket)


def _trainer_parts(config: Config) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """What a :class:`Trainer` is built from (task, model, pooled data): the part of a rank's
    start that can fail on its own, before it joins the process group."""
    from .data.tasks import load_task

    task = load_task(config.task.name, **config.task.options)
    config = resolve_config(config, task)
    model, _ = initial_params(config, task)
    data = make_dataset(config, task).pooled_train()
    d = config.data_parallel
    return (model, task.loss_fn, data), dict(
        batch_size=config.client.batch_size, optimizer=client_optimizer(config),
        seed=config.seed, local_steps=d.local_steps, steps_per_round=d.steps_per_round)


def _trainer_from_config(config: Config) -> Trainer:
    args, kwargs = _trainer_parts(config)
    return Trainer(*args, **kwargs)


def serve_rank(trainer: Trainer) -> None:
    """A rank other than 0: train each round rank 0 announces, until it says stop."""
    cmd = torch.zeros(2, dtype=torch.int64)
    while True:
        dist.broadcast(cmd, 0)
        if int(cmd[0]) == _STOP:
            return
        trainer.train_round(int(cmd[1]), None)


_REGISTERED_HINT = (
    "\nA task or model registered in the script that starts shoal, under its `if __name__ == "
    "\"__main__\":` guard, is unknown to the worker processes (they import the script without "
    "running that block): register it at the script's top level or in a module it imports.")

_RENDEZVOUS_S = 120.0
"""How long rank 0 waits for the started workers to join the process group."""

_JOINED = "shoal/joined/"


def _spawned(rank: int, ready: Any, world: int, init_method: str, backend: str,
             config: dict[str, Any]) -> None:
    watch_parent()
    try:
        torch.set_num_threads(1)
        args, kwargs = _trainer_parts(parse_config(config))  # fails here, not in a collective
    except BaseException:  # noqa: BLE001 - reported to rank 0, which raises it
        report_started(ready, rank, traceback.format_exc() + _REGISTERED_HINT)
        return
    report_started(ready, rank)
    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    wait = dt.timedelta(minutes=30)
    store = dist.TCPStore(host, int(port), world, is_master=False, timeout=wait)
    store.set(f"{_JOINED}{rank}", "1")  # rank 0 joins the group once every worker is here
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
    try:
        serve_rank(Trainer(*args, **kwargs))
    finally:
        dist.destroy_process_group()


def _join_group(workers: Workers, backend: str, init_method: str, world: int,
                timeout: float = _RENDEZVOUS_S) -> None:
    """Rank 0's side of the rendezvous with its spawned workers, watched: rank 0 holds the
    store; each worker checks in there before it joins the process group, and rank 0 joins only
    once every worker has checked in. A worker that exits before stops the run within a second,
    naming the worker and its exit code; a rendezvous that fails or does not complete in
    ``timeout`` seconds stops it too (the workers are stopped either way)."""
    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    wait = dt.timedelta(seconds=timeout)
    store = dist.TCPStore(host, int(port), world, is_master=True, timeout=wait,
                          wait_for_workers=False)
    pending = set(range(1, world))
    deadline = time.monotonic() + timeout
    while pending:
        pending = {r for r in pending if not store.check([f"{_JOINED}{r}"])}
        dead = workers.dead()
        if pending and dead:
            workers.stop()
            rank, code = dead[0]
            raise WorkerError(
                f"data_parallel: worker process {rank} exited with code {code} while the ranks "
                f"were joining the process group (torch.distributed rendezvous at {init_method}, "
                f"backend {backend!r}); its error, if any, is printed above. The run stops here "
                f"and the other workers were stopped. {GUARD_FIX}")
        if pending and time.monotonic() > deadline:
            workers.stop()
            raise WorkerError(
                f"data_parallel: worker processes {sorted(pending)} started but did not join the "
                f"process group (torch.distributed rendezvous at {init_method}) within "
                f"{timeout:g} s; they were stopped. Their output above may say why.")
        time.sleep(0.05)
    try:
        dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=wait)
    except (RuntimeError, ValueError) as e:  # a worker died in its own init, or no backend
        workers.stop()
        dead = workers.dead()
        first = (str(e).splitlines() or [""])[0][:300]
        who = (f"worker process {dead[0][0]} exited with code {dead[0][1]}; "
               if dead and dead[0][1] not in (None, 0, -15) else "")
        raise WorkerError(
            f"data_parallel: the {world} ranks could not form the process group (torch."
            f"distributed rendezvous at {init_method}, backend {backend!r}): {who}"
            f"{type(e).__name__}: {first}. The workers were stopped. Check that the backend is "
            "available here (data_parallel.backend = \"gloo\" runs everywhere) and that the "
            "workers' output above shows no error.") from e
    try:  # collectives wait as long as a round may take, not as long as the rendezvous
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(dt.timedelta(minutes=30))
    except (ImportError, RuntimeError, ValueError):  # pragma: no cover - older torch
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DataParallel:
    """The data-parallel algorithm (see the module docstring); rank 0's side of the run loop.

    With torch.distributed already initialised (``torchrun``) it uses that process group;
    otherwise it spawns ``workers - 1`` local processes on the first round.
    """

    def __init__(self, config: Config, *, trainer: Trainer | None = None):
        d = config.data_parallel
        if d.workers < 1:
            raise ConfigError(f"config field 'data_parallel.workers': expected >= 1, "
                              f"got {d.workers}.")
        self.config = config
        self.workers = d.workers
        self.backend = _backend(d.backend)
        self._trainer = trainer
        self._procs: Workers | None = None
        self._own_group = False

    def __repr__(self) -> str:
        d = self.config.data_parallel
        return (f"DataParallel(workers={self.workers}, backend={self.backend!r}, "
                f"local_steps={d.local_steps})")

    def init(self, params: Params) -> DataParallelState:
        """The state before round 1."""
        return DataParallelState(tree.clone(params))

    def params(self, state: DataParallelState) -> Params:
        """The model's params."""
        return state.params

    def handlers(self) -> dict[str, Handler]:
        """No messages: the workers talk through torch.distributed."""
        return {}

    def _start(self) -> Trainer:
        if self._trainer is not None:
            return self._trainer
        if not dist.is_initialized():
            port = _free_port()
            init = f"tcp://127.0.0.1:{port}"
            cfg = to_dict(self.config)
            workers = Workers("data_parallel", _spawned, self.workers - 1,
                              lambda rank: (self.workers, init, self.backend, cfg))
            workers.wait_started()  # a worker that cannot start stops the run, naming the fix
            _join_group(workers, self.backend, init, self.workers)  # ... or dies joining
            self._procs = workers
            self._own_group = True
        elif dist.get_world_size() != self.workers:
            log.info("data_parallel: using the launcher's %d ranks (config asked for %d)",
                     dist.get_world_size(), self.workers)
        try:
            self._trainer = _trainer_from_config(self.config)  # DDP's first collectives
        except RuntimeError as e:  # a worker died building its own
            failure = self._procs.failure(e) if self._procs is not None else None
            if failure is None:
                raise
            self._abandon()
            raise failure from e
        return self._trainer

    def round(self, state: DataParallelState, transport: Transport,
              round: int) -> tuple[DataParallelState, RoundReport]:
        """Train one round on every rank; rank 0 returns the new params."""
        trainer = self._start()
        try:
            dist.broadcast(torch.tensor([_ROUND, round], dtype=torch.int64), 0)
            params, metrics = trainer.train_round(round, state.params)
        except RuntimeError as e:  # a collective broke: did a worker die?
            failure = self._procs.failure(e) if self._procs is not None else None
            if failure is None:
                raise
            self._abandon()
            raise failure from e
        world, wire = trainer.world, trainer.wire_bytes()
        for r in range(world if world > 1 else 0):
            transport.stats.count(f"rank-{r}", f"rank-{(r + 1) % world}", COLLECTIVE,
                                  int(wire / world))
        report = RoundReport(round, metrics)
        if not tree.is_finite(params):
            report.failed = "the model is not finite (NaN or inf) after the round; kept the last"
            return state, report
        return DataParallelState(params), report

    def close(self) -> None:
        """Tell the other ranks to stop; end the process group this object started."""
        if self._trainer is None or not dist.is_initialized():
            return
        dist.broadcast(torch.tensor([_STOP, 0], dtype=torch.int64), 0)
        self._trainer = None
        if self._own_group:
            dist.destroy_process_group()
            self._own_group = False
        if self._procs is not None:
            self._procs.stop(grace=60)
            self._procs = None

    def _abandon(self) -> None:
        """After a worker died: end the group and stop every other worker (no orphans)."""
        self._trainer = None
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_group = False
        if self._procs is not None:
            self._procs.stop()
            self._procs = None


class _Close:
    def __init__(self, algorithm: DataParallel):
        self.algorithm = algorithm

    def on_run_end(self, ctx: Any) -> None:
        self.algorithm.close()


@register_paradigm("data_parallel")
def data_parallel_paradigm(setup: Setup) -> Built:
    """``paradigm = "data_parallel"``: DDP over ``[data_parallel] workers`` processes."""
    algorithm = DataParallel(setup.config)
    return Built(algorithm, FunctionTransport([], lambda m: m.failed("no nodes")),
                 [_Close(algorithm)])


def main(argv: list[str] | None = None) -> None:
    """``torchrun ... -m shoal data-parallel CONFIG --out DIR [--resume | --overwrite]``: rank 0
    runs the experiment (``paradigm`` forced to ``data_parallel``; it refuses an ``--out`` that
    holds files unless ``--overwrite``), the other ranks train with it."""
    from .config import load_config
    from .experiment import run_experiment

    ap = argparse.ArgumentParser(prog="shoal data-parallel")
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    config = load_config(args.config, [*args.set, "paradigm=data_parallel"])
    if "RANK" not in os.environ:
        raise ConfigError("`shoal data-parallel` is one rank of a job started by torchrun, but "
                          "RANK, WORLD_SIZE and MASTER_ADDR are unset; on one machine use "
                          "`shoal run` with paradigm = \"data_parallel\".")
    dist.init_process_group(_backend(config.data_parallel.backend))
    try:
        if dist.get_rank() == 0:
            run_experiment(config, args.out, resume=args.resume, overwrite=args.overwrite)
        else:
            serve_rank(_trainer_from_config(config))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


