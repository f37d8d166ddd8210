"""The ``processes`` executor: worker processes on ``torch.distributed``, one reduction a round.

The design of the fastest simulators (pfl-research): there is no simulated network. N ranks
(the coordinator's process is rank 0 and works too) each hold one replica of the model and the
federation's data; per round rank 0 broadcasts the round's requests (the global params once)
and which rank trains which client, every rank trains its share of the cohort in place with its
*inner* executor (``sequential`` or ``vectorized``), validates and folds the (pipeline-
processed) updates locally (:class:`~shoal.algorithms.collect.RoundFold`), and the running sums
meet in one ``reduce`` to rank 0. Non-linear reducers (median, Krum) need the individual
updates, so then the updates are gathered instead. Clients are dealt out largest first to the
least loaded rank (by number of examples), which balances the ranks.

Locally, ``ProcessesExecutor(workers)`` spawns ``workers - 1`` processes when it is first used
and stops them at :meth:`close`. Across machines, launch the same script with
``torchrun``: every rank builds the same federation from the same seed, rank 0 runs the loop and
the others call :func:`serve` (see the README, "Performance").

With CUDA present, each rank trains on GPU ``rank % device_count`` (several ranks may share a
GPU) when its inner executor is ``sequential`` and the client update is ``local_sgd``
(:func:`use_gpu`); updates come back to the CPU for folding. The process group
(:func:`backend`) is gloo on CPU; when the ranks train on GPUs and each has a GPU of its own, it
is ``"cpu:gloo,cuda:nccl"``: the round's sums meet in an NCCL ``reduce`` on the GPUs, while the
plans and the gathered objects travel over gloo. Ranks sharing a GPU stay on gloo (NCCL refuses
two ranks of one group on the same device).

Results equal the sequential executor's up to float rounding: each rank adds its own clients'
updates, and the ranks' sums are then added together, a different order of the same additions.
Node state (``NodeContext.state``) lives in the process that ran the client; it is kept only
while a client keeps being dealt to the same rank, so stateful clients need ``sequential``.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import traceback
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import tree
from ..algorithms.collect import Partial, RoundFold
from ..algorithms.fedavg import train_data
from ..errors import ClientError, ConfigError, ShoalError
from ..message import Message
from ..node import NodeContext
from ..transport import TrafficStats
from .executor import EXECUTORS, Executor, make_executor

if TYPE_CHECKING:
    from .inprocess import InProcessTransport

__all__ = ["ProcessesExecutor", "backend", "balance", "serve", "use_gpu"]

log = logging.getLogger(__name__)

_TIMEOUT = datetime.timedelta(hours=6)  # a rank may wait long for the next round (evaluation)


def _nobody() -> None:
    return None


_OWNER: Any = _nobody  # weakref to the executor whose spawned ranks form the default group


def balance(sizes: Sequence[int], ranks: int) -> list[int]:
    """The rank of each client: largest first, each to the least loaded rank (ties: the lower
    rank). ``sizes`` are the clients' numbers of examples."""
    load = [0] * ranks
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += max(int(sizes[i]), 1)
    return out


@dataclass
class _Spec:
    """What a spawned worker needs to build its copy of the simulated federation."""

    node_ids: list[str]
    data_fn: Any
    handlers: dict[str, Any]
    mods: tuple[Any, ...]
    on_error: str
    inner: str
    threads: int


def _work(transport: InProcessTransport, inner: Executor, requests: Sequence[Message],
          mine: list[int], fold: RoundFold, timeout: float | None,
          ) -> tuple[Partial, TrafficStats, tuple[str, str, int, int | None, str] | None]:
    """Train this rank's clients and fold their replies; an exception is returned, not raised,
    so the rank still takes part in the round's collectives."""
    msgs = [requests[i] for i in mine]
    stats = TrafficStats()

    def recorded() -> Iterator[Message]:
        for m, reply in zip(msgs, inner.stream(transport, msgs, timeout), strict=True):
            stats.record(m, reply)
            yield reply

    try:
        part = fold.fold(msgs, recorded(), mine, rows=inner.rows_of)
    except Exception as e:  # noqa: BLE001 - sent to rank 0, which raises it
        client = getattr(e, "client", "?")
        rnd = getattr(e, "round", requests[0].round if requests else 0)
        return fold.start(), stats, (f"{type(e).__name__}: {e}", str(client), int(rnd),
                                     getattr(e, "step", None), traceback.format_exc())
    return part, stats, None


def _reduce_round(transport: InProcessTransport, inner: Executor, plan: dict[str, Any],
                  ) -> tuple[Partial, TrafficStats, list[Any]] | None:
    """Every rank's part of a round; rank 0 gets the merged part, the others ``None``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    requests, fold = plan["requests"], plan["fold"]
    mine = [i for i, r in enumerate(plan["assign"]) if r == rank]
    part, stats, error = _work(transport, inner, requests, mine, fold, plan["timeout"])
    summed = None
    if fold.streams:
        # One reduction of every rank's running sum: a flat vector, zeros for a rank with none,
        # on the rank's GPU when the group reduces with NCCL.
        vec, spec = tree.flatten(fold.params)
        vec = torch.zeros_like(vec)
        if part.running_sum is not None:
            vec = tree.flatten(part.running_sum)[0].clone()
        device = _reduce_device()
        vec = vec.to(device)
        dist.reduce(vec, dst=0, op=dist.ReduceOp.SUM)
        summed = tree.unflatten(vec.cpu(), spec) if rank == 0 else None
        part.running_sum = None
    # Updates may be views into a batch's stacked tensors: clone them, or pickling would send
    # the whole batch with each one.
    part.updates = [{k: v.clone() for k, v in u.items()} for u in part.updates]
    gathered: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object((part, stats, error), gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return None
    parts = [g[0] for g in gathered]
    merged = fold.merge(parts)
    if fold.streams and merged.positions:
        merged.running_sum = summed
    total = TrafficStats()
    for g in gathered:
        s = g[1]
        total.messages_down += s.messages_down
        total.messages_up += s.messages_up
        total.bytes_down += s.bytes_down
        total.bytes_up += s.bytes_up
    return merged, total, [g[2] for g in gathered if g[2] is not None]


def backend(ranks: int, inner: str) -> str:
    """The ``torch.distributed`` backend for ``ranks`` ranks (on one machine) whose inner
    executor is ``inner``: ``"cpu:gloo,cuda:nccl"`` when CUDA and NCCL are present, the ranks
    train on GPUs (``sequential``, see :func:`use_gpu`) and every rank has a GPU of its own;
    ``"gloo"`` otherwise. With both, CUDA tensors (the round's sums) are reduced by NCCL and CPU
    objects (plans, parts) by gloo."""
    if inner == "sequential" and torch.cuda.is_available() and dist.is_nccl_available() \
            and ranks <= torch.cuda.device_count():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _reduce_device() -> torch.device:
    """Where a round's sums meet: this rank's GPU when the group has NCCL, else the CPU."""
    if "nccl" in dist.get_backend_config():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _bind_gpu(rank: int) -> None:
    """Make GPU ``rank % device_count`` this rank's current device when the group has NCCL
    (NCCL reduces on the current device; two ranks on the same one would fail)."""
    if "nccl" in dist.get_backend_config():
        torch.cuda.set_device(rank % torch.cuda.device_count())


def use_gpu(transport: InProcessTransport, rank: int, inner: str) -> torch.device | None:
    """Train this rank's clients on GPU ``rank % device_count`` when CUDA is present, the inner
    executor is ``sequential`` and the train handler's client update can move (``local_sgd``:
    it has a ``device``); returns the device, or ``None`` when training stays on the CPU."""
    if not torch.cuda.is_available() or inner != "sequential":
        return None
    update = getattr(getattr(transport.handlers.get("train"), "__self__", None), "client_update",
                     None)
    if update is None or not hasattr(update, "device"):
        return None
    update.device = torch.device("cuda", rank % torch.cuda.device_count())
    log.info("rank %d trains on %s", rank, update.device)
    return update.device


def serve(transport: InProcessTransport, inner: str | Executor = "sequential") -> None:
    """The loop of every rank but 0: answer rounds until rank 0 closes its executor.

    Call it on ranks 1.. of a ``torchrun`` launch (after ``dist.init_process_group``), with a
    transport built exactly as rank 0 builds its own (same seed, same data, same algorithm).
    """
    executor = make_executor(inner)
    _bind_gpu(dist.get_rank())
    if isinstance(inner, str):
        use_gpu(transport, dist.get_rank(), inner)
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
        if plan is None:
            return
        _reduce_round(transport, executor, plan)


def _worker_main(rank: int, world: int, port: int, payload: bytes, ready: Any) -> None:
    try:
        spec: _Spec = pickle.loads(payload)
        torch.set_num_threads(spec.threads)
        from .inprocess import InProcessTransport
        transport = InProcessTransport(spec.node_ids, spec.data_fn, spec.handlers,
                                       mods=spec.mods, on_error=spec.on_error)  # type: ignore[arg-type]
        ready.put((rank, None))
    except BaseException:  # noqa: BLE001 - reported to the coordinator, which raises it
        ready.put((rank, traceback.format_exc()))
        return
    dist.init_process_group(backend(world, spec.inner), init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=_TIMEOUT)
    try:
        serve(transport, spec.inner)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessesExecutor(Executor):
    """``workers`` ranks (``None``: one per core; the coordinator's process is one of them),
    each computing its clients with the ``inner`` executor; see the module docstring.

    ``threads`` is torch's intra-op threads per rank while training (default: cores divided by
    ranks); the coordinator's own setting is restored after each round, so evaluation between
    rounds uses every core. When ``torch.distributed`` is already initialised (``torchrun``),
    its ranks are the workers and nothing is spawned.
    """

    name = "processes"

    def __init__(self, workers: int | None = None, *, inner: str = "sequential",
                 threads: int | None = None):
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise ConfigError(f"processes executor: workers must be >= 1 or None (one per "
                              f"core), got {workers!r}.")
        if inner not in ("sequential", "vectorized"):
            raise ConfigError(f"processes executor: inner must be 'sequential' or 'vectorized' "
                              f"(got {inner!r}); executors: {', '.join(EXECUTORS)}.")
        self.workers = workers or (os.cpu_count() or 1)
        self.inner_name = inner
        self.inner = make_executor(inner)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.workers)
        self._procs: list[Any] = []
        self._started = False
        self._own_group = False
        self._finalizer: Any = None
        self._in_round = False  # inside a round's collectives (closing then cannot be graceful)

    def __repr__(self) -> str:
        return f"processes({self.workers}, inner={self.inner_name!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, transport: InProcessTransport) -> None:
        """Spawn the workers (or join the ``torchrun`` group); done on first use."""
        global _OWNER
        if self._started:
            return
        owner = _OWNER()
        if owner is not None and owner is not self and owner._own_group:
            raise ShoalError(f"processes executor: {owner!r} already runs worker processes in "
                             "this process; close its transport (transport.close()) first.")
        if dist.is_available() and dist.is_initialized():
            if dist.get_rank() != 0:
                raise ConfigError("processes executor: this process is rank "
                                  f"{dist.get_rank()}; only rank 0 runs rounds, the other ranks "
                                  "call shoal.sim.processes.serve(transport).")
            self.workers = dist.get_world_size()
            _bind_gpu(0)
            use_gpu(transport, 0, self.inner_name)
            self._started = True
            return
        spec = _Spec(transport.nodes(), transport.data_fn, transport.handlers, transport.mods,
                     transport.on_error, self.inner_name, self.threads)
        try:
            payload = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - any pickling failure gets the same advice
            raise ConfigError(
                f"processes executor: cannot send the federation to worker processes: "
                f"{type(e).__name__}: {e}. The data function, handlers and mods must be "
                "picklable (module-level functions, bound methods, classes; not lambdas or "
                "closures); or use executor='sequential' or 'vectorized'."
            ) from e
        port = _free_port()
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        for rank in range(1, self.workers):
            p = ctx.Process(target=_worker_main, args=(rank, self.workers, port, payload, ready),
                            daemon=True)
            p.start()
            self._procs.append(p)
        errors = []
        for _ in range(1, self.workers):
            rank, err = ready.get(timeout=600)
            if err is not None:
                errors.append(f"worker {rank}: {err}")
        if errors:
            self._stop_procs()
            raise ShoalError("processes executor: a worker process could not start:\n"
                             + "\n".join(errors))
        dist.init_process_group(backend(self.workers, self.inner_name),
                                init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=self.workers, timeout=_TIMEOUT)
        self._own_group = True
        _bind_gpu(0)
        use_gpu(transport, 0, self.inner_name)
        self._started = True
        _OWNER = weakref.ref(self)
        self._finalizer = weakref.finalize(self, ProcessesExecutor._shutdown, self._procs,
                                          False)

    @staticmethod
    def _shutdown(procs: list[Any], graceful: bool) -> None:
        # Graceful: the ranks wait for the next round, so tell them to return. Otherwise (at
        # exit, or after an error inside a round's collectives) they may be waiting inside a
        # collective that will never complete: terminate them.
        if dist.is_initialized():
            try:
                if graceful:
                    dist.broadcast_object_list([None], src=0)
            finally:
                dist.destroy_process_group()
        for p in procs:
            p.join(timeout=30 if graceful else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)

    def _stop_procs(self) -> None:
        for p in self._procs:
            p.terminate()
            p.join(timeout=10)
        self._procs.clear()

    def close(self) -> None:
        """Stop the workers (rank 0 tells every rank to return from :func:`serve`)."""
        if not self._started:
            return
        self._started = False
        if self._own_group:
            self._own_group = False
            self._finalizer.detach()
            self._shutdown(self._procs, not self._in_round)
            self._procs.clear()
        elif dist.is_initialized() and not self._in_round:
            dist.broadcast_object_list([None], src=0)

    # -- rounds ------------------------------------------------------------------------------

    def stream(self, transport: InProcessTransport, messages: Sequence[Message],
               timeout: float | None) -> Iterator[Message]:
        """Messages other than a round's train requests (e.g. federated evaluation) are
        answered here, on rank 0, by the inner executor."""
        return self.inner.stream(transport, messages, timeout)

    def collect(self, transport: InProcessTransport, requests: Sequence[Message],
                fold: RoundFold, timeout: float | None) -> Partial:
        """Train the cohort on every rank, fold locally, reduce once; see the module docstring."""
        self.start(transport)
        sizes = [len(train_data(NodeContext(m.dst, transport.data_fn(m.dst))))
                 if transport.knows(m.dst) else 0 for m in requests]
        plan = {"requests": list(requests), "assign": balance(sizes, self.workers),
                "fold": fold, "timeout": timeout}
        threads = torch.get_num_threads()
        self._in_round = True
        try:
            dist.broadcast_object_list([plan], src=0)
            torch.set_num_threads(self.threads)
            out = _reduce_round(transport, self.inner, plan)
            self._in_round = False
        finally:
            torch.set_num_threads(threads)
        assert out is not None
        merged, traffic, errors = out
        transport.stats.messages_down += traffic.messages_down
        transport.stats.messages_up += traffic.messages_up
        transport.stats.bytes_down += traffic.bytes_down
        transport.stats.bytes_up += traffic.bytes_up
        if errors:
            message, client, rnd, step, tb = errors[0]
            raise ClientError(f"{message}\n(raised in a worker process; its traceback:)\n{tb}",
                              client=client, round=rnd, step=step)
        return merged
