"""``FedAvg``: federated averaging and the family composed from it.

Per round: sample a cohort, send each client the global params (``"train"``), let each client
run its ``ClientUpdate`` and the pipeline's client-side stages, validate every reply, reduce
the valid updates with the pipeline, and apply the result with the server optimizer.

FedProx is ``local_sgd(prox_mu > 0)``; FedAvgM/FedAdam/FedYogi/FedAdagrad are server
optimizers; robust FedAvg is a robust reducer; DP-FedAvg and secure aggregation are stages.

Clients also answer ``"evaluate"``: they evaluate the params they are sent on their own
held-out data (federated evaluation).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import tree
from ..aggregate import Pipeline, ServerOpt, sgd
from ..aggregate.anomaly import anomaly_scores
from ..aggregate.server_opt import ServerOptState
from ..aggregate.stages import StageState
from ..algorithm import RoundReport
from ..client import Batchable, ClientUpdate, Placeable
from ..data.arrays import ArrayData
from ..errors import ConfigError
from ..message import COORDINATOR, Message
from ..metrics import weighted_average
from ..node import Abilities, BatchAnswers, BatchHandler, CapableHandler, Handler, NodeContext
from ..seeding import derive_seed, derive_seeds
from ..transport import Transport
from ..tree import Params
from ..types import ClientInfo, ClientResult, RoundInfo
from .cohort import Cohort
from .collect import Partial, RoundFold
from .influence import CLIENT_NAMESPACES, WeightCap

__all__ = ["ClientEvaluate", "FedAvg", "FedAvgState", "TrainBatch", "eval_data", "train_data"]

log = logging.getLogger(__name__)

ClientEvaluate = Callable[[Params, ArrayData], dict[str, float]]
"""``fn(params, data) -> metrics`` with an ``"examples"`` count (e.g. a ``shoal.Evaluator``)."""


@dataclass
class FedAvgState:
    """The coordinator's state: global params, server optimizer state, stage states."""

    params: Params
    opt_state: ServerOptState = field(default_factory=dict)
    stage_states: list[StageState] = field(default_factory=list)


def train_data(context: NodeContext) -> ArrayData:
    """A node's training data: ``data.train`` of a ``ClientData``, or the data itself."""
    return getattr(context.data, "train", context.data)


def eval_data(context: NodeContext) -> ArrayData | None:
    """A node's held-out evaluation data (``data.eval``), or ``None``."""
    return getattr(context.data, "eval", None)


class FedAvg:
    """Federated averaging (McMahan et al. 2017) with a pluggable pipeline and server optimizer.

    Args:
        client_update: what each client does (e.g. ``local_sgd(...)``).
        pipeline: stages and reducer (default: example-weighted mean).
        server_opt: how the aggregate is applied (default: ``sgd(1.0)``, plain FedAvg).
        cohort: clients per round (default: all reachable clients).
        min_replies: fewest valid replies for a round's update to be applied; with fewer the
            round is recorded as failed and the model is left unchanged.
        timeout: seconds a client may take; a slower client is dropped from the round.
        client_eval: ``fn(params, data) -> metrics`` run by clients on ``"evaluate"``.
        seed: the run's seed (cohorts and each client's randomness derive from it).
        weight_cap: the most weight a client's reply counts with
            (:class:`~shoal.algorithms.influence.WeightCap`; ``None``: its claim, unchecked —
            one client claiming 1e30 then replaces the model).
    """

    def __init__(self, client_update: ClientUpdate, *, pipeline: Pipeline | None = None,
                 server_opt: ServerOpt | None = None, cohort: Cohort | None = None,
                 min_replies: int = 1, timeout: float | None = None,
                 client_eval: ClientEvaluate | None = None, seed: int = 0,
                 weight_cap: WeightCap | None = None):
        self.client_update = client_update
        self.pipeline = pipeline if pipeline is not None else Pipeline()
        self.server_opt = server_opt if server_opt is not None else sgd(1.0)
        self.cohort = cohort if cohort is not None else Cohort()
        need = self.pipeline.reducer.min_updates
        if min_replies < need:
            raise ConfigError(
                f"FedAvg: min_replies is {min_replies}, but {self.pipeline.reducer!r} needs at "
                f"least {need} updates; set min_replies >= {need}."
            )
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"FedAvg: timeout must be > 0 seconds or None (got {timeout}).")
        self.min_replies = min_replies
        self.timeout = timeout
        self.client_eval = client_eval
        self.seed = seed
        self.weight_cap = weight_cap

    def __repr__(self) -> str:
        return (f"FedAvg({self.client_update!r}, {self.pipeline!r}, {self.server_opt!r}, "
                f"{self.cohort!r}, min_replies={self.min_replies})")

    # -- coordinator side -------------------------------------------------------------------

    def init(self, params: Params) -> FedAvgState:
        """The state before round 1."""
        params = tree.clone(params)
        return FedAvgState(params, self.server_opt.init(params), self.pipeline.init())

    def params(self, state: FedAvgState) -> Params:
        """The global params."""
        return state.params

    def client_seed(self, round: int, client_id: str) -> int:
        """The seed of ``client_id``'s randomness in ``round``."""
        return derive_seed(self.seed, "client", round, client_id)

    def client_infos(self, messages: Sequence[Message]) -> list[ClientInfo]:
        """``client_info(m, m.dst)`` for each of ``messages``, the seeds derived together
        (:func:`~shoal.seeding.derive_seeds`) unless a subclass derives them otherwise."""
        cls = type(self)
        if cls.client_seed is not FedAvg.client_seed or cls.client_info is not FedAvg.client_info:
            return [self.client_info(m, m.dst) for m in messages]
        seeds = derive_seeds([(self.seed, "client", m.round, m.dst) for m in messages])
        return [ClientInfo(m.dst, m.round, s, m.config)
                for m, s in zip(messages, seeds, strict=True)]

    def train_requests(self, state: FedAvgState, chosen: Sequence[str], round: int,
                       configs: list[dict]) -> list[Message]:
        """The round's ``"train"`` requests: the global params and the stages' configs (one
        tensor dict shared by every request, so an executor sees one model)."""
        return [Message("train", COORDINATOR, cid, round, state.params, {"stages": configs})
                for cid in chosen]

    def round_fold(self, state: FedAvgState, configs: list[dict], round: int) -> RoundFold:
        """How the round's train replies are validated and folded."""
        return RoundFold(self.pipeline, state.params, configs, round, self.seed,
                         weight_cap=self.weight_cap)

    def round(self, state: FedAvgState, transport: Transport,
              round: int) -> tuple[FedAvgState, RoundReport]:
        """One round of federated averaging; see the module docstring."""
        population = transport.nodes()
        chosen = self.cohort.sample(population, self.seed, round)
        configs = self.pipeline.client_configs(state.stage_states)
        requests = self.train_requests(state, chosen, round, configs)
        report = RoundReport(round)
        fold = self.round_fold(state, configs, round)
        # The transport folds the replies: as they stream, or where they are computed (an
        # executor with worker processes) before merging the parts.
        part = transport.collect(requests, fold, self.timeout)
        for _, dst, reason in part.dropped:
            report.dropped[dst] = reason
            log.warning("round %d: dropped %s: %s", round, dst, reason)
        m = report.metrics
        if part.metrics:  # the clients' claims (their namespaces only), then our own counts
            m.update({k: v for k, v in weighted_average(part.metrics, "weight").items()
                      if k != "weight"})
            m["train/examples"] = math.fsum(c.get("train/examples", 0.0) for c in part.metrics)
        self._anomalies(part, chosen, m)
        m["round/sampled"] = float(len(chosen))
        m["round/replied"] = float(len(part.positions))
        m["round/dropped"] = float(len(report.dropped))
        if self.weight_cap is not None:
            m["round/weights_capped"] = float(part.capped)
        if part.refused:
            m["round/metrics_refused"] = float(part.refused)
            log.warning("round %d: refused %d metric value(s) outside the clients' namespaces "
                        "(%s) or not finite", round, part.refused, ", ".join(CLIENT_NAMESPACES))
        info = RoundInfo(round, self.seed, len(chosen), len(part.positions), len(population))
        return self.finish_round(state, fold, part, info, report)

    @staticmethod
    def _anomalies(part: Partial, chosen: Sequence[str], m: dict[str, float]) -> None:
        """Per-client anomaly scores (:mod:`shoal.aggregate.anomaly`) when the reducer kept
        the round's updates (robust reducers do; a running mean does not): the smallest
        cosine with the median update, the largest norm ratio, how many were flagged, and the
        cosine of each flagged client under ``anomaly/client/ID``."""
        fold = part.fold
        if fold.linear or not fold.updates:
            return
        scores = anomaly_scores(fold.updates)
        m["anomaly/cos_min"] = min(a.cosine for a in scores)
        m["anomaly/norm_ratio_max"] = max(a.norm_ratio for a in scores)
        flagged = [(pos, a) for pos, a in zip(fold.positions, scores, strict=True) if a.flagged]
        m["anomaly/flagged"] = float(len(flagged))
        for pos, a in flagged:
            m[f"anomaly/client/{chosen[pos]}"] = a.cosine

    def finish_round(self, state: FedAvgState, fold: RoundFold, part: Partial, info: RoundInfo,
                     report: RoundReport) -> tuple[FedAvgState, RoundReport]:
        """From the folded replies to the new state: the reduced update (a round with fewer
        than ``min_replies`` valid replies fails, model unchanged), then :meth:`apply`."""
        reduced, count = fold.finish(part)
        if reduced is None or count < self.min_replies:
            report.failed = (f"only {count} valid replies of {info.sampled} sampled; "
                             f"min_replies is {self.min_replies}")
            report.retry = True
            log.warning("round %d not applied: %s", info.round, report.failed)
            return state, report
        return self.apply(state, reduced, info, report)

    def apply(self, state: FedAvgState, reduced: Params, info: RoundInfo,
              report: RoundReport) -> tuple[FedAvgState, RoundReport]:
        """Finish a round from the reduced update: the pipeline's server halves, a finiteness
        check (a non-finite aggregate fails the round, model unchanged), the server optimizer."""
        m = report.metrics
        aggregate, stage_states, stage_metrics = self.pipeline.finish(
            reduced, state.stage_states, info)
        m.update(stage_metrics)
        if not tree.is_finite(aggregate):
            report.failed = "the aggregated update is not finite (NaN or inf); model left unchanged"
            log.warning("round %d not applied: %s", info.round, report.failed)
            return state, report
        m["update/norm"] = tree.norm(aggregate)
        params, opt_state = self.server_opt.apply(state.params, aggregate, state.opt_state)
        # replace(): an algorithm built on FedAvg keeps the fields its state adds.
        return dataclasses.replace(state, params=params, opt_state=opt_state,
                                   stage_states=stage_states), report

    # -- client side ------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """``"train"`` (local update; batched when the client update is :class:`Batchable`,
        placed on a device when it is :class:`Placeable`) and ``"evaluate"`` (federated
        evaluation)."""
        update = self.client_update
        abilities = Abilities(
            batch=self._train_batch if isinstance(update, Batchable) else None,
            why_not_batched=(f"the client update {update!r} has no batched form (it is not "
                             "Batchable)"),
            place=self._place if isinstance(update, Placeable) else None)
        return {"train": CapableHandler(self.handle_train, abilities),
                "evaluate": self.handle_evaluate}

    def _train_batch(self) -> TrainBatch:
        assert isinstance(self.client_update, Batchable)
        return TrainBatch(self, self.client_update.batched())

    def _place(self, device: torch.device) -> None:
        assert isinstance(self.client_update, Placeable)
        self.client_update.device = device

    def handle_train(self, message: Message, context: NodeContext) -> Message:
        """Train on the node's data and answer with the (stage-processed) update."""
        info = self.client_info(message, context.node_id)
        result = self.client_update(message.tensors, train_data(context), info)
        return self.train_reply(message, result, info)

    def answer_batch(self, trainer: Any, messages: Sequence[Message],
                     contexts: Sequence[NodeContext]) -> BatchAnswers:
        """:meth:`handle_train` for messages carrying the same params to clients whose data
        are views of one pool, computed by the client update's batched form ``trainer``."""
        infos = self.client_infos(messages)
        batch = trainer.cohort(messages[0].tensors, [train_data(c) for c in contexts], infos)
        out = BatchAnswers([])
        for i, (m, r, info, j) in enumerate(zip(messages, batch.results, infos, batch.row,
                                                strict=True)):
            reply = self.train_reply(m, r, info)
            out.replies.append(reply)
            t = reply.tensors
            if t.keys() == batch.deltas.keys() and all(t[k] is r.update[k] for k in t):
                out.rows[i] = (batch.deltas, j)
        return out

    def client_info(self, message: Message, node_id: str) -> ClientInfo:
        """What client ``node_id`` knows when it answers the train ``message``."""
        return ClientInfo(node_id, message.round, self.client_seed(message.round, node_id),
                          message.config)

    def train_reply(self, message: Message, result: ClientResult, info: ClientInfo) -> Message:
        """The reply to a train ``message``: ``result``'s update through the client-side
        stages, with its weight and metrics (executors that compute updates in batches use
        this too)."""
        update = self.pipeline.client(result.update, message.config.get("stages", []), info)
        return message.reply(tensors=update, config={"weight": result.weight},
                             metrics=result.metrics)

    def handle_evaluate(self, message: Message, context: NodeContext) -> Message:
        """Evaluate the params sent on the node's held-out data."""
        data = eval_data(context)
        if self.client_eval is None:
            return message.failed("this federation has no client evaluation function")
        if data is None or len(data) == 0:
            return message.reply(metrics={"examples": 0.0})
        return message.reply(metrics=self.client_eval(message.tensors, data))


class TrainBatch(BatchHandler):
    """The batched form of an algorithm's ``"train"`` handler: messages grouped by the params
    they carry and the data pool of their clients, each group answered by the algorithm's
    ``answer_batch`` with the client update's batched ``trainer``."""

    def __init__(self, algorithm: FedAvg, trainer: Any):
        self.algorithm = algorithm
        self.trainer = trainer
        self.numel = int(trainer.numel)

    def __repr__(self) -> str:
        return f"TrainBatch({self.trainer!r})"

    def __call__(self, messages: Sequence[Message],
                 contexts: Sequence[NodeContext]) -> BatchAnswers:
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, (m, c) in enumerate(zip(messages, contexts, strict=True)):
            data = train_data(c)
            groups.setdefault((id(m.tensors), id(data.x), id(data.y)), []).append(i)
        replies: list[Message | None] = [None] * len(messages)
        rows: dict[int, tuple[Params, int]] = {}
        for ix in groups.values():
            got = self.algorithm.answer_batch(self.trainer, [messages[i] for i in ix],
                                              [contexts[i] for i in ix])
            for i, reply in zip(ix, got.replies, strict=True):
                replies[i] = reply
            rows.update({ix[k]: v for k, v in got.rows.items()})
        return BatchAnswers([r for r in replies if r is not None], rows)

    def trial(self, context: NodeContext) -> None:
        """Train the node on two of its examples with the batched form (an operation vmap
        cannot batch shows only when it runs)."""
        self.trainer.trial(train_data(context))
