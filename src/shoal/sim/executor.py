"""Executors: how the in-process simulation computes the replies of simulated clients.

The transport (:class:`~shoal.sim.InProcessTransport`) decides *who* answers; its executor
decides *how* the answers are computed. The algorithm is the same object whichever runs:

``sequential``  one message after the other, by the node's handler: the debugging executor
                (with ``on_error="raise"`` an exception inside a client is re-raised as a
                ``ClientError`` naming the client, the round and the local step, the original
                exception chained with its traceback).
``vectorized``  messages whose handler declares a batched form (:class:`~shoal.node.Abilities`;
                e.g. FedAvg's and SCAFFOLD's ``"train"`` with ``local_sgd``) are answered for
                the whole cohort in one batched computation (:mod:`shoal.batched`); other
                messages one by one.
``processes``   worker processes on ``torch.distributed`` that each answer their share of the
                messages and fold a round's updates locally; one reduction per round
                (:mod:`shoal.sim.processes`).
``auto``        the fastest that fits: processes when the machine has several cores and the
                cohort several clients — one rank per client up to one per core, the cores
                left over as each rank's threads — each rank vectorized when the train
                handler's batched form passes a trial run and the model is small; sequential
                otherwise.

An executor asks a handler what it can do; it never recognises an algorithm. A kind whose
handler has no batched form, or whose batched form cannot run this model, is answered one by
one, and the executor logs why once.

Every executor runs each client from its own seed (``shoal.seeding``), so results do not depend
on the order in which clients run. Sequential and the plain transport are bit-identical;
vectorized and processes agree within float rounding (see each module for why).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from ..algorithms.collect import Partial, RoundFold
from ..errors import ConfigError, ModelError
from ..message import Message
from ..node import BatchHandler, NodeState, abilities_of
from ..tree import Params

if TYPE_CHECKING:
    from .inprocess import InProcessTransport

__all__ = ["EXECUTORS", "AutoExecutor", "Executor", "ExecutorName", "SequentialExecutor",
           "VectorizedExecutor", "batch_handler", "make_executor", "vectorizable"]

log = logging.getLogger(__name__)

ExecutorName = Literal["sequential", "vectorized", "processes", "auto"]
EXECUTORS: tuple[str, ...] = ("sequential", "vectorized", "processes", "auto")

AUTO_VECTORIZE_MAX_PARAMS = 1_000_000
"""``auto`` vectorizes models up to this many parameters: small models gain most from
batching, large ones already keep a core busy per client."""


class Executor:
    """Base class: computes replies for the transport's simulated nodes.

    ``stream(transport, messages, timeout)`` yields one reply per message, in order, and shows
    each message and its reply to the transport's observers (``transport.record``);
    ``collect(transport, requests, fold, timeout)`` folds the train replies of a round (the
    default folds the stream); ``close()`` releases what the executor holds (processes).
    """

    name: str = "executor"

    def stream(self, transport: InProcessTransport, messages: Sequence[Message],
               timeout: float | None) -> Iterator[Message]:
        """One reply per message, in order."""
        raise NotImplementedError

    def collect(self, transport: InProcessTransport, requests: Sequence[Message],
                fold: RoundFold, timeout: float | None) -> Partial:
        """The round's train replies, folded (see :class:`~shoal.algorithms.collect.RoundFold`)."""
        return fold.fold(requests, transport.stream(requests, timeout), rows=self.rows_of)

    def rows_of(self, reply: Message) -> tuple[Params, int] | None:
        """``(stacks, j)`` when ``reply``'s tensors are all row ``j`` of stacked tensors this
        executor computed (see ``RoundFold.fold``); ``None`` by default."""
        return None

    def release(self) -> None:
        """Forget what the latest batch keeps for :meth:`rows_of` (after folding it)."""

    def close(self) -> None:
        """Release workers or other resources (nothing by default)."""

    def __repr__(self) -> str:
        return f"{self.name}()"


class SequentialExecutor(Executor):
    """One message after the other, by the node's own handler; see the module docstring."""

    name = "sequential"

    def stream(self, transport: InProcessTransport, messages: Sequence[Message],
               timeout: float | None) -> Iterator[Message]:
        for m in messages:
            reply = transport.deliver(m, timeout)
            transport.record(m, reply)
            yield reply


def batch_handler(transport: InProcessTransport, kind: str) -> BatchHandler:
    """The batched form of the transport's handler for ``kind``; raises
    :class:`~shoal.errors.ConfigError` / :class:`~shoal.errors.ModelError` saying why there is
    none."""
    abilities = abilities_of(transport.handlers.get(kind))
    if abilities.batch is None:
        raise ConfigError(f"the {kind!r} handler cannot be batched: "
                          f"{abilities.why_not_batched}")
    return abilities.batch()


def vectorizable(transport: InProcessTransport, kind: str = "train") -> str | None:
    """Why the vectorized executor cannot batch the transport's ``kind`` messages, or
    ``None`` (a trial run on one client included)."""
    try:
        handler = batch_handler(transport, kind)
        ids = transport.nodes()
        if ids:
            handler.trial(transport.context(ids[0]))
    except (ConfigError, ModelError) as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any failure of the trial means: do not batch
        return f"{type(e).__name__}: {e}"
    return None


class VectorizedExecutor(Executor):
    """Messages whose handler has a batched form in batches of up to ``max_clients`` nodes
    (``None``: all of a kind), other messages one by one; see the module docstring.

    The replies still go through the nodes' middleware (dropout, logging): each node answers
    with its precomputed result, and what the batch wrote into a node's state is kept only
    when the node's handler is reached (a dropped node's state is unchanged, as in the
    sequential executor). A node that a mod drops was computed in vain, which costs time but
    changes nothing. The request's timeout is not applied to batched nodes (a batch's time
    cannot be attributed to one of them). An exception inside a batch reruns that batch's
    messages one by one, so the failing client is named (or dropped) as the sequential
    executor would. A kind that cannot be batched (no batched form, or one that refuses this
    model or optimizer) is answered one by one, and why is logged once.
    """

    name = "vectorized"

    def __init__(self, max_clients: int | None = None):
        if max_clients is not None and max_clients < 1:
            raise ConfigError(f"vectorized executor: max_clients must be >= 1 or None "
                              f"(got {max_clients}).")
        self.max_clients = max_clients
        self._handlers: dict[str, tuple[Any, BatchHandler | None]] = {}
        self.fallbacks: dict[str, str] = {}
        """Kind -> why its messages are answered one by one."""
        # id(reply.tensors) -> (the batch's stacked tensors, row, the row views handed out):
        # the replies of the latest stream, for rows_of.
        self._rows: dict[int, tuple[Params, int, Params]] = {}

    def __repr__(self) -> str:
        return f"vectorized({'' if self.max_clients is None else self.max_clients})"

    def handler(self, transport: InProcessTransport, kind: str) -> BatchHandler | None:
        """The batched form of ``kind``'s handler (built once), or ``None`` (logged once)."""
        source = transport.handlers.get(kind)
        held = self._handlers.get(kind)
        if held is None or held[0] is not source:
            try:
                made: BatchHandler | None = batch_handler(transport, kind)
            except (ConfigError, ModelError) as e:
                self._fall_back(kind, str(e))
                made = None
            held = (source, made)
            self._handlers[kind] = held
        return held[1]

    def _fall_back(self, kind: str, why: str) -> None:
        if kind not in self.fallbacks:
            self.fallbacks[kind] = why
            log.warning("vectorized executor: %r messages run one by one (sequentially): %s",
                        kind, why)
        self._handlers[kind] = (self._handlers.get(kind, (None, None))[0], None)

    def stream(self, transport: InProcessTransport, messages: Sequence[Message],
               timeout: float | None) -> Iterator[Message]:
        done: dict[int, tuple[Message, NodeState]] = {}
        self._rows.clear()
        by_kind: dict[str, list[Message]] = {}
        for m in messages:
            if transport.knows(m.dst):
                by_kind.setdefault(m.kind, []).append(m)
        for kind, msgs in by_kind.items():
            if kind in self.fallbacks or self.handler(transport, kind) is None:
                continue
            size = self.max_clients or len(msgs)
            for start in range(0, len(msgs), size):
                self._batch(transport, kind, msgs[start:start + size], done)
        for m in messages:
            held = done.get(id(m))
            reply = (transport.deliver(m, timeout) if held is None
                     else transport.deliver(m, None, answer=held[0], state=held[1]))
            transport.record(m, reply)
            yield reply

    def _batch(self, transport: InProcessTransport, kind: str, chunk: list[Message],
               done: dict[int, tuple[Message, NodeState]]) -> None:
        handler = self.handler(transport, kind)
        if handler is None:
            return
        contexts = [transport.context(m.dst, m.round) for m in chunk]
        t0 = time.perf_counter()
        try:
            answers = handler(chunk, contexts)
        except ModelError as e:  # the model cannot run batched: from now on, one by one
            self._fall_back(kind, str(e))
            return
        except Exception as e:  # noqa: BLE001 - find the failing client: the sequential path names it
            log.warning("round %d: a batch of %d %r messages failed (%s: %s); running them one "
                        "by one", chunk[0].round, len(chunk), kind, type(e).__name__, e)
            return
        seconds = time.perf_counter() - t0
        # The batch's compute time, shared among its nodes by the examples each trained on.
        shares = [max(r.metrics.get("train/examples", 1.0), 1.0) for r in answers.replies]
        total = sum(shares)
        for m, reply, ctx, share in zip(chunk, answers.replies, contexts, shares, strict=True):
            done[id(m)] = (reply, ctx.node_state)
            transport.record_compute(m.dst, seconds * share / total)
        for i, (stacks, j) in answers.rows.items():
            t = answers.replies[i].tensors
            self._rows[id(t)] = (stacks, j, dict(t))

    def collect(self, transport: InProcessTransport, requests: Sequence[Message],
                fold: RoundFold, timeout: float | None) -> Partial:
        try:
            return super().collect(transport, requests, fold, timeout)
        finally:
            self.release()

    def release(self) -> None:
        """The batch's stacks stay alive only as long as a reply needs them."""
        self._rows.clear()

    def rows_of(self, reply: Message) -> tuple[Params, int] | None:
        """``(stacks, j)`` for a reply of the latest batch whose tensors are still the rows it
        was given (a mod or stage that replaced one makes it an ordinary reply)."""
        held = self._rows.get(id(reply.tensors))
        if held is None:
            return None
        stacks, j, views = held
        t = reply.tensors
        if t.keys() != views.keys() or any(t[k] is not v for k, v in views.items()):
            return None
        return stacks, j


class AutoExecutor(Executor):
    """Picks an executor on first use (see :func:`make_executor`) and delegates to it."""

    name = "auto"

    def __init__(self, workers: int | None = None):
        self.workers = workers
        self.chosen: Executor | None = None

    def __repr__(self) -> str:
        return f"auto({self.chosen!r})" if self.chosen else "auto()"

    def choose(self, transport: InProcessTransport, cohort: int | None = None) -> Executor:
        """The executor for this transport (see the module docstring): clients are batched
        only if the train handler's batched form passes a trial run on one client and has at
        most :data:`AUTO_VECTORIZE_MAX_PARAMS` parameters; with ``workers`` unset, the ranks
        are as many as the cohort's clients (the first batch of messages), at most one per
        core, and each rank gets the cores left over as intra-op threads."""
        if self.chosen is not None:
            return self.chosen
        why = vectorizable(transport)
        if why is None:
            numel = batch_handler(transport, "train").numel
            if numel > AUTO_VECTORIZE_MAX_PARAMS:
                why = (f"the model has {numel:,} parameters, more than "
                       f"{AUTO_VECTORIZE_MAX_PARAMS:,}")
        inner = "vectorized" if why is None else "sequential"
        if why is not None:
            log.info("executor auto: not vectorizing: %s", why)
        cores = os.cpu_count() or 1
        workers = self.workers if self.workers else min(cores, max(cohort or cores, 1))
        if workers > 1:
            from .processes import ProcessesExecutor
            self.chosen = ProcessesExecutor(workers, inner=inner,
                                            threads=max(1, cores // workers))
        else:
            self.chosen = VectorizedExecutor() if inner == "vectorized" else SequentialExecutor()
        log.info("executor auto: chose %r", self.chosen)
        return self.chosen

    def stream(self, transport: InProcessTransport, messages: Sequence[Message],
               timeout: float | None) -> Iterator[Message]:
        return self.choose(transport, len(messages)).stream(transport, messages, timeout)

    def collect(self, transport: InProcessTransport, requests: Sequence[Message],
                fold: RoundFold, timeout: float | None) -> Partial:
        return self.choose(transport, len(requests)).collect(transport, requests, fold, timeout)

    def close(self) -> None:
        if self.chosen is not None:
            self.chosen.close()


def make_executor(name: str | Executor | None = "sequential", *, workers: int | None = None,
                  inner: str = "sequential") -> Executor:
    """An executor by name (``"sequential"``, ``"vectorized"``, ``"processes"``, ``"auto"``);
    ``workers`` is the number of worker processes (``None``: one per core) and ``inner`` how
    each worker computes its clients (processes only)."""
    if name is None:
        return SequentialExecutor()
    if isinstance(name, Executor):
        return name
    if name == "sequential":
        return SequentialExecutor()
    if name == "vectorized":
        return VectorizedExecutor()
    if name == "processes":
        from .processes import ProcessesExecutor
        return ProcessesExecutor(workers, inner=inner)
    if name == "auto":
        return AutoExecutor(workers)
    raise ConfigError(f"executor: unknown executor {name!r}; expected one of "
                      f"{', '.join(repr(e) for e in EXECUTORS)}.")
