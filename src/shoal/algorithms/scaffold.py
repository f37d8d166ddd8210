"""``Scaffold``: SCAFFOLD (Karimireddy et al. 2020) — FedAvg with control variates against
client drift.

The coordinator keeps a control variate ``c`` (one tensor per trained param) and sends it with
the global params; each client keeps its own ``c_i`` in its node state (it never leaves the
client) and adds ``c - c_i`` to every local gradient, so its steps follow the federation's
average gradient rather than its own. After K local SGD steps of size η from ``x`` to ``y_i``
it updates, with the paper's option II,

    c_i+ = c_i - c + (x - y_i) / (K η)          Δc_i = c_i+ - c_i = -c - Δy_i / (K η)

and replies with its model update ``Δy_i`` and ``Δc_i``. The coordinator reduces the ``Δy_i``
with the pipeline and applies them with the server optimizer (the server learning rate
``η_g`` is ``sgd(η_g)``), and moves ``c <- c + (1/N) Σ Δc_i`` over the ``N`` clients of the
population (partial participation: ``c`` stays the mean of all clients' ``c_i``).

It changes the conversation (two more tensors each way, state on the clients), so it is an
algorithm of its own, built on FedAvg's round: the same cohorts, pipeline, fold, validation,
server optimizer and evaluation. A client with no ``c_i`` yet starts from zeros, so with
``c = 0`` its first round is exactly FedAvg's. The control-variate updates are averaged
uniformly in a fold channel of their own, whatever the pipeline does with the model update;
a stage whose guarantee covers only the model update (DP-FedAvg, secure aggregation) is
refused, since ``Δc_i`` would travel unprotected beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import tree
from ..aggregate import Pipeline, ServerOpt, weighted_mean
from ..algorithm import RoundReport
from ..client import Correctable
from ..errors import ConfigError
from ..message import COORDINATOR, Message
from ..node import BatchAnswers, NodeContext
from ..tree import Params
from ..types import RoundInfo
from .cohort import Cohort
from .collect import Channel, Partial, RoundFold
from .fedavg import ClientEvaluate, FedAvg, FedAvgState, train_data
from .influence import WeightCap

__all__ = ["CONTROL", "CONTROL_UPDATE", "CONTROL_CHANNEL", "NODE_CONTROL", "Scaffold",
           "ScaffoldState"]

log = logging.getLogger(__name__)

CONTROL = "scaffold/c/"
"""Name prefix of the coordinator's control variate in a train request."""

CONTROL_UPDATE = "scaffold/dc/"
"""Name prefix of a client's control-variate update ``Δc_i`` in its train reply."""

CONTROL_CHANNEL = "control"
"""The fold channel of the control-variate updates."""

NODE_CONTROL = "scaffold/c_i"
"""The node-state entry holding a client's control variate (param name -> tensor)."""


@dataclass
class ScaffoldState(FedAvgState):
    """FedAvg's state plus the coordinator's control variate ``control`` (trained params)."""

    control: Params = field(default_factory=dict)


class Scaffold(FedAvg):
    """SCAFFOLD over any transport; arguments as :class:`FedAvg`.

    ``client_update`` must be :class:`~shoal.client.Correctable` with plain SGD steps
    (``local_sgd`` with ``torch.optim.SGD``, momentum 0, prox_mu 0): the control variates of
    option II are averages of plain SGD steps. ``server_opt=sgd(η_g)`` sets the server learning
    rate.
    """

    def __init__(self, client_update: Correctable, *, pipeline: Pipeline | None = None,
                 server_opt: ServerOpt | None = None, cohort: Cohort | None = None,
                 min_replies: int = 1, timeout: float | None = None,
                 client_eval: ClientEvaluate | None = None, seed: int = 0,
                 weight_cap: WeightCap | None = None):
        if not isinstance(client_update, Correctable):
            raise ConfigError(
                f"Scaffold: the client update {client_update!r} cannot take gradient "
                "corrections; SCAFFOLD needs local_sgd(...) with plain SGD steps.")
        self.lr = client_update.step_size()  # raises, naming the fix, unless plain SGD
        self.trained = list(client_update.trainable())
        super().__init__(client_update, pipeline=pipeline, server_opt=server_opt,  # type: ignore[arg-type]
                         cohort=cohort, min_replies=min_replies, timeout=timeout,
                         client_eval=client_eval, seed=seed, weight_cap=weight_cap)
        protecting = [s for s in self.pipeline.stages if s.protects_updates]
        if protecting:
            raise ConfigError(
                f"Scaffold: {protecting[0]!r} protects only the model update, but SCAFFOLD also "
                "sends each client's control-variate update beside it, which would travel "
                "unprotected; use FedAvg (federated.algorithm = \"fedavg\") with differential "
                "privacy or secure aggregation.")

    def __repr__(self) -> str:
        return (f"Scaffold({self.client_update!r}, {self.pipeline!r}, {self.server_opt!r}, "
                f"{self.cohort!r}, min_replies={self.min_replies})")

    # -- coordinator side -------------------------------------------------------------------

    def init(self, params: Params) -> ScaffoldState:
        """The state before round 1: ``c = 0``."""
        base = super().init(params)
        control = {k: torch.zeros_like(params[k]) for k in self.trained}
        return ScaffoldState(base.params, base.opt_state, base.stage_states, control)

    def train_requests(self, state: FedAvgState, chosen: Sequence[str], round: int,
                       configs: list[dict]) -> list[Message]:
        """The global params and ``c`` (one tensor dict shared by every request)."""
        assert isinstance(state, ScaffoldState)
        tensors = {**state.params, **{CONTROL + k: v for k, v in state.control.items()}}
        return [Message("train", COORDINATOR, cid, round, tensors, {"stages": configs})
                for cid in chosen]

    def round_fold(self, state: FedAvgState, configs: list[dict], round: int) -> RoundFold:
        """The model update through the pipeline; ``Δc_i`` in a uniform-mean channel."""
        assert isinstance(state, ScaffoldState)
        template = {CONTROL_UPDATE + k: torch.zeros_like(v) for k, v in state.control.items()}
        return RoundFold(self.pipeline, state.params, configs, round, self.seed,
                         {CONTROL_CHANNEL: Channel(template, weighted_mean("uniform"))},
                         weight_cap=self.weight_cap)

    def finish_round(self, state: FedAvgState, fold: RoundFold, part: Partial, info: RoundInfo,
                     report: RoundReport) -> tuple[FedAvgState, RoundReport]:
        """FedAvg's update of the model; then, if it was applied,
        ``c <- c + (m / N) * mean(Δc_i)`` over the ``m`` valid replies of ``N`` clients."""
        new, report = super().finish_round(state, fold, part, info, report)
        if report.failed is not None:
            return new, report  # c unchanged with the model (see the module docstring)
        assert isinstance(new, ScaffoldState)
        mean, count = fold.finish(part, CONTROL_CHANNEL)
        if mean is None:
            return new, report
        scale = count / max(info.population, 1)
        control = {k: v + mean[CONTROL_UPDATE + k] * scale for k, v in new.control.items()}
        report.metrics["scaffold/control_norm"] = tree.norm(control)
        new = ScaffoldState(new.params, new.opt_state, new.stage_states, control)
        return new, report

    # -- client side ------------------------------------------------------------------------

    def _split(self, message: Message) -> tuple[Params, Params]:
        """The params and ``c`` a train request carries."""
        t = message.tensors
        params = {k: v for k, v in t.items() if not k.startswith(CONTROL)}
        control = {k: t[CONTROL + k] for k in self.trained}
        return params, control

    def handle_train(self, message: Message, context: NodeContext) -> Message:
        """Train with the correction ``c - c_i``; update ``c_i`` in the node state; reply with
        the (stage-processed) update and ``Δc_i``."""
        info = self.client_info(message, context.node_id)
        params, control = self._split(message)
        own = context.node_state.get(NODE_CONTROL)
        correction = control if own is None else {k: control[k] - own[k] for k in control}
        update = self.client_update
        assert isinstance(update, Correctable)
        result = update.train(params, train_data(context), info, correction)
        steps = result.metrics.get("train/steps", 0.0)
        delta = {k: self._control_delta(control[k], result.update[k], steps)
                 for k in self.trained}
        context.node_state[NODE_CONTROL] = {k: delta[k] if own is None else own[k] + delta[k]
                                            for k in self.trained}
        reply = self.train_reply(message.with_tensors(params), result, info)
        return reply.with_tensors({**reply.tensors,
                                   **{CONTROL_UPDATE + k: v for k, v in delta.items()}})

    def _control_delta(self, c: torch.Tensor, update: torch.Tensor,
                       steps: float) -> torch.Tensor:
        """``Δc_i = -c - Δy_i / (K η)`` (zeros for a client that took no step)."""
        if steps <= 0:
            return torch.zeros_like(c)
        return -c - update / (steps * self.lr)

    def answer_batch(self, trainer: Any, messages: Sequence[Message],
                     contexts: Sequence[NodeContext]) -> BatchAnswers:
        """:meth:`handle_train` for a group of clients at once: the corrections go into the
        batched steps, ``Δc_i`` is computed for the whole stack."""
        params, control = self._split(messages[0])
        infos = self.client_infos(messages)
        owns = [c.node_state.get(NODE_CONTROL) for c in contexts]
        corrections = [control if own is None else {k: control[k] - own[k] for k in control}
                       for own in owns]
        batch = trainer.cohort(params, [train_data(c) for c in contexts], infos, corrections)
        steps = torch.zeros(len(messages), dtype=torch.float64)
        for r, j in zip(batch.results, batch.row, strict=True):
            steps[j] = r.metrics.get("train/steps", 0.0)
        # 1 / (K η) per row, 0 for a client that took no step: Δc = -c - Δy / (K η).
        inv = torch.where(steps > 0, 1.0 / (steps.clamp(min=1.0) * self.lr), 0.0)
        dstacks: Params = {}
        for k in self.trained:
            d = batch.deltas[k]
            scale = inv.to(d.dtype).view(-1, *([1] * (d.dim() - 1)))
            rows = torch.where(steps.view_as(scale) > 0, -control[k] - d * scale, 0.0)
            dstacks[CONTROL_UPDATE + k] = rows.to(d.dtype)
        out = BatchAnswers([])
        stacks = {**batch.deltas, **dstacks}
        for i, (m, r, info, j, ctx, own) in enumerate(zip(messages, batch.results, infos,
                                                          batch.row, contexts, owns,
                                                          strict=True)):
            delta = {k: dstacks[CONTROL_UPDATE + k][j] for k in self.trained}
            ctx.node_state[NODE_CONTROL] = {k: delta[k].clone() if own is None
                                            else own[k] + delta[k] for k in self.trained}
            reply = self.train_reply(m.with_tensors(params), r, info)
            t = {**reply.tensors, **{CONTROL_UPDATE + k: v for k, v in delta.items()}}
            out.replies.append(reply.with_tensors(t))
            if all(reply.tensors[k] is r.update[k] for k in reply.tensors) \
                    and t.keys() == stacks.keys():
                out.rows[i] = (stacks, j)
        return out
