"""Executors: how the in-process simulation computes the replies of simulated clients.

The transport (:class:`~shoal.sim.InProcessTransport`) decides *who* answers; its executor
decides *how* the answers are computed. The algorithm is the same object whichever runs:

``sequential``  one message after the other, by the node's handler: the debugging executor
                (with ``on_error="raise"`` an exception inside a client is re-raised as a
                ``ClientError`` naming the client, the round and the local step, the original
                exception chained with its traceback).
``vectorized``  FedAvg's ``local_sgd`` for the whole cohort in one batched computation
                (``torch.func.vmap`` over stacked client params; :mod:`shoal.sim.vectorized`);
                a model or client update that cannot be vectorized is refused with a
                ``ModelError`` / ``ConfigError`` naming why.
``processes``   worker processes on ``torch.distributed`` that each train their share of the
                cohort and fold the updates locally; one reduction per round
                (:mod:`shoal.sim.processes`).
``auto``        the fastest that fits: processes when the machine has several cores, each
                worker vectorized when the model can be vectorized and is small; falls back to
                sequential otherwise.

Every executor runs each client from its own seed (``shoal.seeding``), so results do not depend
on the order in which clients run. Sequential and the plain transport are bit-identical;
vectorized and processes agree within float rounding (see each module for why).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .. import tree
from ..algorithms.collect import Partial, RoundFold
from ..algorithms.fedavg import FedAvg, train_data
from ..errors import ConfigError, ModelError
from ..message import Message
from ..node import NodeContext
from ..tree import Params
from ..types import ClientInfo
from .vectorized import VectorizedLocalSGD, check_vectorizable, sgd_spec

if TYPE_CHECKING:
    from .inprocess import InProcessTransport

__all__ = ["EXECUTORS", "AutoExecutor", "Executor", "ExecutorName", "SequentialExecutor",
           "VectorizedExecutor", "make_executor", "vectorizable"]

log = logging.getLogger(__name__)

ExecutorName = Literal["sequential", "vectorized", "processes", "auto"]
EXECUTORS: tuple[str, ...] = ("sequential", "vectorized", "processes", "auto")

AUTO_VECTORIZE_MAX_PARAMS = 1_000_000
"""``auto`` vectorizes models up to this many parameters: small models gain most from
batching, large ones already keep a core busy per client."""


class Executor:
    """Base class: computes replies for the transport's simulated nodes.

    ``stream(transport, messages, timeout)`` yields one reply per message, in order;
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
        """``(stacks, j)`` when ``reply``'s update tensors are all row ``j`` of stacked tensors
        this executor computed (see ``RoundFold.fold``); ``None`` by default."""
        return None

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
            yield transport.deliver(m, timeout)


def _fedavg_of(transport: InProcessTransport) -> FedAvg:
    """The FedAvg whose own ``handle_train`` answers the transport's train messages."""
    handler = transport.handlers.get("train")
    algorithm = getattr(handler, "__self__", None)
    if not isinstance(algorithm, FedAvg) or \
            getattr(handler, "__func__", None) is not FedAvg.handle_train:
        raise ConfigError(
            f"vectorized executor: the 'train' handler is {handler!r}; it batches FedAvg's "
            "own handle_train (FedAvg and its compositions) only; use executor='sequential' or "
            "'processes'."
        )
    return algorithm


def vectorizable(transport: InProcessTransport) -> str | None:
    """Why the vectorized executor cannot run this transport's train messages, or ``None``."""
    try:
        algorithm = _fedavg_of(transport)
        sgd_spec(algorithm.client_update)
        check_vectorizable(algorithm.client_update.model)  # type: ignore[attr-defined]
    except (ConfigError, ModelError) as e:
        return str(e)
    return None


class VectorizedExecutor(Executor):
    """FedAvg's train messages in batches of up to ``max_clients`` clients (``None``: the
    whole cohort), other messages one by one; see :mod:`shoal.sim.vectorized`.

    The replies still go through the nodes' middleware (dropout, logging): each node answers
    with its precomputed result. A client that a mod drops was computed in vain, which costs
    time but changes nothing. The request's timeout is not applied to batched clients (a
    batch's time cannot be attributed to one of them). An exception inside a batch reruns that
    batch's clients one by one, so the failing client is named (or dropped) as the sequential
    executor would.
    """

    name = "vectorized"

    def __init__(self, max_clients: int | None = None):
        if max_clients is not None and max_clients < 1:
            raise ConfigError(f"vectorized executor: max_clients must be >= 1 or None "
                              f"(got {max_clients}).")
        self.max_clients = max_clients
        self._trainers: dict[int, tuple[Any, VectorizedLocalSGD]] = {}
        # id(reply.tensors) -> (the batch's stacked updates, row, the row views handed out):
        # the replies of the latest stream, for rows_of.
        self._rows: dict[int, tuple[Params, int, Params]] = {}

    def __repr__(self) -> str:
        return f"vectorized({'' if self.max_clients is None else self.max_clients})"

    def trainer(self, algorithm: FedAvg) -> VectorizedLocalSGD:
        """The batched local SGD of ``algorithm`` (built once)."""
        key = id(algorithm.client_update)
        held = self._trainers.get(key)
        if held is None or held[0] is not algorithm.client_update:
            held = (algorithm.client_update,
                    VectorizedLocalSGD(algorithm.client_update))  # type: ignore[arg-type]
            self._trainers[key] = held
        return held[1]

    def stream(self, transport: InProcessTransport, messages: Sequence[Message],
               timeout: float | None) -> Iterator[Message]:
        train = [m for m in messages if m.kind == "train" and transport.knows(m.dst)]
        done: dict[int, Message] = {}
        self._rows.clear()
        if train:
            algorithm = _fedavg_of(transport)
            trainer = self.trainer(algorithm)
            groups: dict[tuple[int, int, int], list[tuple[Message, Any]]] = {}
            for m in train:
                data = train_data(NodeContext(m.dst, transport.data_fn(m.dst)))
                groups.setdefault((id(m.tensors), id(data.x), id(data.y)), []).append((m, data))
            size = self.max_clients
            for group in groups.values():
                for start in range(0, len(group), size or len(group)):
                    chunk = group[start:start + (size or len(group))]
                    self._batch(algorithm, trainer, chunk, done, self._rows)
        for m in messages:
            reply = done.get(id(m))
            if reply is None:
                yield transport.deliver(m, timeout)
            else:
                yield transport.deliver(m, None, answer=reply)

    def collect(self, transport: InProcessTransport, requests: Sequence[Message],
                fold: RoundFold, timeout: float | None) -> Partial:
        try:
            return super().collect(transport, requests, fold, timeout)
        finally:
            self._rows.clear()  # the batch's stacks stay alive only as long as a reply needs them

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

    @staticmethod
    def _batch(algorithm: FedAvg, trainer: VectorizedLocalSGD,
               chunk: list[tuple[Message, Any]], done: dict[int, Message],
               rows: dict[int, tuple[Params, int, Params]]) -> None:
        infos = algorithm.client_infos([m for m, _ in chunk])
        params = chunk[0][0].tensors
        try:
            batch = trainer.cohort(params, [d for _, d in chunk], infos)
        except ModelError:
            raise
        except Exception as e:  # find the failing client: the sequential path names it
            log.warning("round %d: a batch of %d clients failed (%s: %s); running them one by "
                        "one", chunk[0][0].round, len(chunk), type(e).__name__, e)
            return
        for (m, _), r, info, j in zip(chunk, batch.results, infos, batch.row, strict=True):
            reply = algorithm.train_reply(m, r, info)
            done[id(m)] = reply
            t = reply.tensors
            if t.keys() <= batch.deltas.keys() and all(t[k] is r.update.get(k) for k in t):
                rows[id(t)] = (batch.deltas, j, dict(t))


def _probe(transport: InProcessTransport) -> str | None:
    """Train one client on two of its examples with the vectorized trainer: why that failed
    (an operation vmap cannot batch shows only when it runs), or ``None``."""
    ids = transport.nodes()
    if not ids:
        return None
    algorithm = _fedavg_of(transport)
    data = train_data(NodeContext(ids[0], transport.data_fn(ids[0])))
    if len(data) == 0:
        return None
    update = algorithm.client_update
    params = tree.params_of(update.model)  # type: ignore[attr-defined]
    try:
        VectorizedLocalSGD(update)(params, [data.subset(list(range(min(2, len(data)))))],  # type: ignore[arg-type]
                                   [ClientInfo(ids[0], 0, 0)])
    except Exception as e:  # noqa: BLE001 - any failure means: do not vectorize
        return f"{type(e).__name__}: {e}"
    return None


class AutoExecutor(Executor):
    """Picks an executor on first use (see :func:`make_executor`) and delegates to it."""

    name = "auto"

    def __init__(self, workers: int | None = None):
        self.workers = workers
        self.chosen: Executor | None = None

    def __repr__(self) -> str:
        return f"auto({self.chosen!r})" if self.chosen else "auto()"

    def choose(self, transport: InProcessTransport) -> Executor:
        """The executor for this transport (see the module docstring); a model is vectorized
        only if it passes the static checks and a one-client trial run."""
        if self.chosen is not None:
            return self.chosen
        why = vectorizable(transport)
        if why is None:
            why = _probe(transport)
        small = False
        if why is None:
            model = _fedavg_of(transport).client_update.model  # type: ignore[attr-defined]
            small = tree.numel(dict(model.named_parameters())) <= AUTO_VECTORIZE_MAX_PARAMS
        inner = "vectorized" if why is None and small else "sequential"
        if why is not None:
            log.info("executor auto: not vectorizing: %s", why)
        workers = self.workers if self.workers else (os.cpu_count() or 1)
        if workers > 1:
            from .processes import ProcessesExecutor
            self.chosen = ProcessesExecutor(workers, inner=inner)
        else:
            self.chosen = VectorizedExecutor() if inner == "vectorized" else SequentialExecutor()
        log.info("executor auto: chose %r", self.chosen)
        return self.chosen

    def stream(self, transport: InProcessTransport, messages: Sequence[Message],
               timeout: float | None) -> Iterator[Message]:
        return self.choose(transport).stream(transport, messages, timeout)

    def collect(self, transport: InProcessTransport, requests: Sequence[Message],
                fold: RoundFold, timeout: float | None) -> Partial:
        return self.choose(transport).collect(transport, requests, fold, timeout)

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
