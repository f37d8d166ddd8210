"""The ``processes`` executor: worker processes on ``torch.distributed``, one reduction a round.

The design of the fastest simulators (pfl-research): there is no simulated network. N ranks
(the coordinator's process is rank 0 and works too) each hold one replica of the model and the
federation's data; rank 0 deals out every batch of messages — a round's train requests, but
also secure aggregation's steps and federated evaluation — and each rank answers its share
with its *inner* executor (``sequential`` or ``vectorized``). A round's train replies are
validated and folded where they are computed (:class:`~shoal.algorithms.collect.RoundFold`,
every part started from the round's update template) and the running sums of all ranks meet
in one ``reduce`` to rank 0; non-linear reducers (median, Krum) need the individual updates,
so then the updates are gathered instead. Other replies are gathered to rank 0 in order.
Clients are dealt out largest first to the least loaded rank (by number of examples), which
balances the ranks; within a round a client stays on the rank it was first dealt to, so the
scratch state of a multi-step protocol (secure aggregation's keys) stays where it was made.

Node state (:class:`~shoal.node.NodeStore`, e.g. SCAFFOLD's control variates) lives with rank
0's transport and travels with its client: the state of the clients dealt to a rank goes out
with the rank's share and comes back with its answers, so clients can move between ranks from
round to round and checkpoints see every client's state. Observers (traffic, compute time,
audits) see every message on every rank: each rank records into an empty part of each of rank
0's observers, which rank 0 merges back.

Locally, ``ProcessesExecutor(workers)`` spawns ``workers - 1`` processes when it is first used
and stops them at :meth:`close`. Across machines, launch the same script with
``torchrun``: every rank builds the same federation from the same seed, rank 0 runs the loop and
the others call :func:`serve` (see docs/performance.md).

With CUDA present, each rank trains on GPU ``rank % device_count`` (several ranks may share a
GPU) when its inner executor is ``sequential`` and the client update is ``local_sgd``
(:func:`use_gpu`); updates come back to the CPU for folding. The process group
(:func:`backend`) is gloo on CPU; when the ranks train on GPUs and each has a GPU of its own, it
is ``"cpu:gloo,cuda:nccl"``: the round's sums meet in an NCCL ``reduce`` on the GPUs, while the
plans and the gathered objects travel over gloo. Ranks sharing a GPU stay on gloo (NCCL refuses
two ranks of one group on the same device).

Results equal the sequential executor's up to float rounding: each rank adds its own clients'
updates, and the ranks' sums are then added together, a different order of the same additions.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import time
import traceback
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .. import tree
from ..algorithms.collect import Partial, RoundFold
from ..algorithms.fedavg import train_data
from ..errors import ClientError, ConfigError, ShoalError
from ..message import Message
from ..node import NodeContext, abilities_of
from ..tree import Params
from ..workers import Workers, report_started, watch_parent
from .executor import EXECUTORS, Executor, make_executor

if TYPE_CHECKING:
    from .inprocess import InProcessTransport

__all__ = ["ProcessesExecutor", "backend", "balance", "serve", "use_gpu"]

log = logging.getLogger(__name__)

_TIMEOUT = datetime.timedelta(hours=6)  # a rank may wait long for the next round (evaluation)


def _nobody() -> None:
    return None


_OWNER: Any = _nobody  # weakref to the executor whose spawned ranks form the default group


def balance(sizes: Sequence[int], ranks: int, load: list[int] | None = None) -> list[int]:
    """The rank of each client: largest first, each to the least loaded rank (ties: the lower
    rank). ``sizes`` are the clients' numbers of examples; ``load`` (updated in place) what
    each rank already has."""
    load = load if load is not None else [0] * ranks
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += max(int(sizes[i]), 1)
    return out


@dataclass
class _Spec:
    """What a spawned worker needs to build its copy of the simulated federation."""

    node_ids: Sequence[str]
    data_fn: Any
    handlers: dict[str, Any]
    mods: tuple[Any, ...]
    on_error: str
    inner: str
    threads: int
    keys: Any


_Error = tuple[str, str, int, "int | None", str]
"""An exception in a rank: message, client, round, local step, traceback."""


def _error(e: BaseException, requests: Sequence[Message]) -> _Error:
    client = getattr(e, "client", "?")
    rnd = getattr(e, "round", requests[0].round if requests else 0)
    return (f"{type(e).__name__}: {e}", str(client), int(rnd), getattr(e, "step", None),
            traceback.format_exc())


def _own(tensors: Params) -> Params:
    """The tensors, each a copy of its own when it is a view into a larger storage (pickling a
    view sends its whole storage, e.g. a batch's every update)."""
    return {k: v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v
            for k, v in tensors.items()}


def _answer(transport: InProcessTransport, inner: Executor, plan: dict[str, Any]) -> Any:
    """This rank's share of a batch of messages: the folded part of a round's train replies
    (``plan["fold"]``) or the replies themselves; errors are returned, not raised, so the rank
    still takes part in the collectives. Observers record into ``plan["observers"]``."""
    msgs: list[Message] = plan["requests"]
    positions: list[int] = plan["positions"]
    fold: RoundFold | None = plan["fold"]
    saved = transport.observers
    transport.observers = plan["observers"]
    transport.restore_node_states(plan["states"])
    error = None
    out: Any = fold.start() if fold is not None else []
    try:
        replies = inner.stream(transport, msgs, plan["timeout"])  # recorded by the executor
        if fold is not None:
            out = fold.fold(msgs, replies, positions, rows=inner.rows_of)
        else:
            out = [r.with_tensors(_own(r.tensors)) for r in replies]
    except Exception as e:  # noqa: BLE001 - sent to rank 0, which raises it
        error = _error(e, msgs)
    finally:
        transport.observers = saved
        inner.release()
    states = {n: transport.node_states().get(n) for n in dict.fromkeys(m.dst for m in msgs)}
    return out, states, error


_STOP = "stop"


def _round(transport: InProcessTransport, inner: Executor, plans: list[dict[str, Any]] | None,
           ) -> Any:
    """Every rank's part of one batch; rank 0 (``plans``: one per rank) gets the merged
    answer, the observers' parts, the node states and the errors; the others ``None``, or
    :data:`_STOP` when rank 0 closes the executor."""
    rank, world = dist.get_rank(), dist.get_world_size()
    box: list[Any] = [None]
    dist.scatter_object_list(box, plans, src=0)
    plan = box[0]
    if plan is None:
        return _STOP
    out, states, error = _answer(transport, inner, plan)
    fold: RoundFold | None = plan["fold"]
    summed: dict[str, Params] = {}
    if fold is not None:
        # One reduction of every rank's running sums: every part was started from the round's
        # templates, so the vectors have one length on every rank (zeros where a rank had no
        # client), on the rank's GPU when the group reduces with NCCL.
        sums = {name: f.sum for name, f in sorted(out.folds.items()) if f.linear}
        if sums:
            vec, spec = tree.flatten({f"{c}/{k}": v for c, p in sums.items()
                                      for k, v in p.items()})
            vec = vec.to(_reduce_device())
            dist.reduce(vec, dst=0, op=dist.ReduceOp.SUM)
            if rank == 0:
                flat = tree.unflatten(vec.cpu(), spec)
                summed = {c: {k: flat[f"{c}/{k}"] for k in p} for c, p in sums.items()}
        for f in out.folds.values():
            f.updates = [_own(u) for u in f.updates]
            if f.linear:
                f.detach_sum()
    if rank != 0:  # the clients' state lives with rank 0: it goes back with the answers
        transport.forget(list(states))
    gathered: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object((out, plan["observers"], states if rank else {}, error),
                       gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return None
    errors = [g[3] for g in gathered if g[3] is not None]
    parts = [g[1] for g in gathered]
    merged_states = {n: s for g in gathered for n, s in g[2].items()}
    if fold is None:
        order = sorted((p, r) for g, pl in zip(gathered, plans or [], strict=True)
                       for p, r in zip(pl["positions"], g[0], strict=True))
        return [r for _, r in order], parts, merged_states, errors
    merged = fold.merge([g[0] for g in gathered])
    for name, s in summed.items():
        merged.folds[name].attach_sum(s)
    return merged, parts, merged_states, errors


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
    executor is ``sequential`` and the train handler can move its computation (it declares
    ``place``, as FedAvg's does for ``local_sgd``); returns the device, or ``None`` when
    training stays on the CPU."""
    if not torch.cuda.is_available() or inner != "sequential":
        return None
    place = abilities_of(transport.handlers.get("train")).place
    if place is None:
        return None
    device = torch.device("cuda", rank % torch.cuda.device_count())
    place(device)
    log.info("rank %d trains on %s", rank, device)
    return device


def serve(transport: InProcessTransport, inner: str | Executor = "sequential") -> None:
    """The loop of every rank but 0: answer batches until rank 0 closes its executor.

    Call it on ranks 1.. of a ``torchrun`` launch (after ``dist.init_process_group``), with a
    transport built exactly as rank 0 builds its own (same seed, same data, same algorithm).
    """
    executor = make_executor(inner)
    _bind_gpu(dist.get_rank())
    if isinstance(inner, str):
        use_gpu(transport, dist.get_rank(), inner)
    while _round(transport, executor, None) is not _STOP:
        pass


def _worker_main(rank: int, ready: Any, world: int, port: int, payload: bytes) -> None:
    watch_parent()
    try:
        spec: _Spec = pickle.loads(payload)
        torch.set_num_threads(spec.threads)
        from .inprocess import InProcessTransport
        transport = InProcessTransport(spec.node_ids, spec.data_fn, spec.handlers,
                                       mods=spec.mods, on_error=spec.on_error,  # type: ignore[arg-type]
                                       keys=spec.keys)
        report_started(ready, rank)
    except BaseException:  # noqa: BLE001 - reported to the coordinator, which raises it
        report_started(ready, rank, traceback.format_exc())
        return
    dist.init_process_group(backend(world, spec.inner), init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=_TIMEOUT)
    try:
        serve(transport, spec.inner)
    finally:
        dist.destroy_process_group()


def _size(transport: InProcessTransport, node_id: str) -> int:
    """A node's number of training examples (its load), 0 for a node without data."""
    if not transport.knows(node_id):
        return 0
    data = train_data(NodeContext(node_id, transport.data_fn(node_id)))
    return len(data) if hasattr(data, "__len__") else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessesExecutor(Executor):
    """``workers`` ranks (``None``: one per core; the coordinator's process is one of them),
    each computing its share of the messages with the ``inner`` executor; see the module
    docstring.

    ``threads`` is torch's intra-op threads per rank while training (default: cores divided by
    ranks); the coordinator's own setting is restored after each batch, so evaluation between
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
        self._procs: Workers | None = None
        self._started = False
        self._own_group = False
        self._finalizer: Any = None
        self._in_round = False  # inside a batch's collectives (closing then cannot be graceful)
        self._homes: dict[str, int] = {}  # node -> rank, within one round
        self._homes_round: int | None = None
        self._load: list[int] = [0] * self.workers  # examples dealt to each rank this round

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
                     transport.on_error, self.inner_name, self.threads, transport.keys)
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
        workers = Workers("processes executor", _worker_main, self.workers - 1,
                          lambda rank: (self.workers, port, payload))
        workers.wait_started()  # raises within a second of a worker's death, naming the fix
        self._procs = workers
        dist.init_process_group(backend(self.workers, self.inner_name),
                                init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=self.workers, timeout=_TIMEOUT)
        self._own_group = True
        _bind_gpu(0)
        use_gpu(transport, 0, self.inner_name)
        self._started = True
        _OWNER = weakref.ref(self)
        self._finalizer = weakref.finalize(self, ProcessesExecutor._shutdown, self._procs,
                                          False, self.workers)

    @staticmethod
    def _shutdown(procs: Workers | None, graceful: bool, world: int) -> None:
        # Graceful: the ranks wait for the next batch, so tell them to return. Otherwise (at
        # exit, or after an error inside a batch's collectives) they may be waiting inside a
        # collective that will never complete: terminate them.
        if dist.is_initialized():
            try:
                if graceful:
                    dist.scatter_object_list([None], [None] * world, src=0)
            except RuntimeError:  # a rank is gone: nothing to say goodbye to
                graceful = False
            finally:
                dist.destroy_process_group()
        if procs is not None:
            procs.stop(grace=30 if graceful else 0.1)

    def close(self) -> None:
        """Stop the workers (rank 0 tells every rank to return from :func:`serve`)."""
        if not self._started:
            return
        self._started = False
        if self._own_group:
            self._own_group = False
            self._finalizer.detach()
            self._shutdown(self._procs, not self._in_round, self.workers)
            self._procs = None
        elif dist.is_initialized() and not self._in_round:
            dist.scatter_object_list([None], [None] * self.workers, src=0)

    # -- batches -----------------------------------------------------------------------------

    def _deal(self, transport: InProcessTransport, messages: Sequence[Message]) -> list[int]:
        """The rank of each message: a node keeps the rank it got earlier in the same round;
        the others are dealt out largest first to the least loaded rank."""
        rnd = messages[0].round if messages else None
        if rnd != self._homes_round:
            self._homes, self._homes_round = {}, rnd
            self._load = [0] * self.workers
        new = [n for n in dict.fromkeys(m.dst for m in messages) if n not in self._homes]
        sizes = [_size(transport, n) for n in new]
        for n, r in zip(new, balance(sizes, self.workers, self._load), strict=True):
            self._homes[n] = r
        return [self._homes[m.dst] for m in messages]

    def _run(self, transport: InProcessTransport, messages: Sequence[Message],
             fold: RoundFold | None, timeout: float | None) -> Any:
        """Deal ``messages`` out, answer them on every rank, merge; see the module docstring."""
        self.start(transport)
        parts = [o.part() for o in transport.observers]
        if any(p is None for p in parts):
            bad = [o for o, p in zip(transport.observers, parts, strict=True) if p is None]
            raise ConfigError(f"processes executor: observer {bad[0]!r} cannot be sent to worker "
                              "processes (its part() is None); use executor='sequential' or "
                              "'vectorized'.")
        assign = self._deal(transport, messages)
        stores = transport.node_states()
        plans = []
        for rank in range(self.workers):
            mine = [i for i, r in enumerate(assign) if r == rank]
            msgs = [messages[i] for i in mine]
            plans.append({"requests": msgs, "positions": mine, "fold": fold, "timeout": timeout,
                          "observers": [o.part() for o in transport.observers],
                          "states": {} if rank == 0 else {m.dst: stores.get(m.dst)
                                                          for m in msgs}})
        threads = torch.get_num_threads()
        self._in_round = True
        t0 = time.perf_counter()
        try:
            torch.set_num_threads(self.threads)
            try:
                out = _round(transport, self.inner, plans)
            except RuntimeError as e:  # a collective broke: did a worker die?
                failure = self._procs.failure(e) if self._procs is not None else None
                if failure is None:
                    raise
                self.close()  # stops every worker: no orphans
                raise failure from e
            self._in_round = False
        finally:
            torch.set_num_threads(threads)
            transport.busy_s += time.perf_counter() - t0  # the ranks' work, rank 0's included
        assert out is not None
        answer, observed, states, errors = out
        for part in observed:
            for o, p in zip(transport.observers, part, strict=True):
                o.merge(p)
        transport.restore_node_states(states)
        if errors:
            message, client, rnd, step, tb = errors[0]
            raise ClientError(f"{message}\n(raised in a worker process; its traceback:)\n{tb}",
                              client=client, round=rnd, step=step)
        return answer

    def stream(self, transport: InProcessTransport, messages: Sequence[Message],
               timeout: float | None) -> Iterator[Message]:
        """Every message answered on the rank it is dealt to; the replies in order (what the
        ranks' observers saw is merged into the transport's)."""
        return iter(self._run(transport, messages, None, timeout))

    def collect(self, transport: InProcessTransport, requests: Sequence[Message],
                fold: RoundFold, timeout: float | None) -> Partial:
        """Train the cohort on every rank, fold locally, reduce once; see the module docstring."""
        return self._run(transport, requests, fold, timeout)
