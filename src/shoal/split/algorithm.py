"""``SplitLearning``: split learning as a per-batch conversation on the core.

The coordinator is the server: it holds the server's part of the model and drives each client
through message kinds (every tensor crosses in a :class:`~shoal.message.Message`, so the same
conversation runs in-process or over a network transport)::

    split.begin     down: the client part's params        up: how many steps the client has
    split.forward   down: the step number                 up: activations at the cut
                                                              (+ labels, or example ids)
    split.head      down: the server's output (U-shaped)  up: gradient at the head's input
    split.backward  down: gradient at the cut             up: client metrics (distance corr.)
    split.end       down: -                               up: the client part's update

Schedules: ``"vanilla"`` (SplitNN): the sampled clients take turns, each training the client
part it is handed (through the server) on all its batches; ``"splitfed"`` (Thapa et al. 2022,
SplitFed V1 with the server copies averaged every step): the sampled clients start the round
from the same client part and run in parallel, the server takes one step per batch index on the
example-weighted mean of the clients' losses, and the client parts are averaged at the end of
the round with the federated :class:`~shoal.aggregate.Pipeline` and server optimizer (any stage
and reducer of the core applies).

Labels: with ``labels="client"`` the client sends its batch's labels with the activations
(vanilla SplitNN); with ``labels="server"`` the labels belong to the server (two-party split
learning, Li et al. 2021): the client sends the ids of its examples and the server looks the
labels up with ``label_fn``. U-shaped models keep the labels on the client.

A client that fails mid-turn is dropped from the rest of the round: the server keeps the steps
it took on that client's batches, the client part it was training is discarded (vanilla hands
on the part it was given; SplitFed averages the others).

The server's and the clients' torch optimizers are built afresh every round (as FedAvg's
clients' are); use plain SGD for results that do not depend on the round length.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import tree
from ..aggregate import Pipeline, ServerOpt, sgd
from ..aggregate.server_opt import ServerOptState
from ..aggregate.stages import StageState
from ..algorithm import RoundReport
from ..algorithms.cohort import Cohort
from ..algorithms.collect import RoundFold
from ..algorithms.fedavg import train_data
from ..algorithms.influence import WeightCap
from ..client import LossFn, OptimizerFn, local_sgd
from ..data.arrays import ArrayData
from ..errors import ConfigError, UpdateError
from ..message import COORDINATOR, Message
from ..node import Handler, NodeContext
from ..seeding import derive_seed, torch_generator
from ..transport import Transport
from ..tree import Params
from ..types import ClientInfo, RoundInfo
from ..validation import reply_problem
from .cut import SplitModel, check_activations
from .leakage import LabelLeakage, distance_correlation
from .protect import CutContext, CutStage

__all__ = ["LabelFn", "SplitLearning", "SplitState"]

log = logging.getLogger(__name__)

Schedule = Literal["vanilla", "splitfed"]
LabelFn = Callable[[str, Tensor], Tensor]
"""``label_fn(client_id, example_ids) -> labels``: the server's own labels (``labels="server"``)."""

KINDS = ("split.begin", "split.forward", "split.head", "split.backward", "split.end")
"""The message kinds of the conversation, in the order of one client's turn."""


@dataclass
class SplitState:
    """The coordinator's state: the full model's params (client and server parts), and the
    SplitFed pipeline's stage states and server optimizer state for the client part."""

    params: Params
    opt_state: ServerOptState = field(default_factory=dict)
    stage_states: list[StageState] = field(default_factory=list)


@dataclass
class _Turn:
    """The coordinator's view of one client in a round."""

    client: str
    steps: int
    weight: float = 0.0


class _RoundLog:
    """Sums of a round's per-batch figures."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.examples = 0
        self.steps = 0
        self.dcor: list[float] = []


class SplitLearning:
    """Split learning (SplitNN, U-shaped, SplitFed) over any transport; see the module docstring.

    Args:
        split: the cut model (:func:`~shoal.split.cut_model`).
        loss_fn: ``loss(output, target)``, the mean over the batch.
        schedule: ``"vanilla"`` (clients take turns) or ``"splitfed"`` (clients in parallel).
        epochs, batch_size, max_steps: each client's passes over its data per round, its batch
            size, and at most this many steps per round.
        optimizer: the torch optimizer of both sides (default ``SGD(lr=0.01)``).
        protections: :class:`~shoal.split.protect.CutStage` s on the tensors crossing the cut.
        pipeline, server_opt: how SplitFed averages the client parts (default: example-weighted
            mean, applied with ``sgd(1.0)``); unused by the vanilla schedule.
        cohort: which clients take part in each round (default: all).
        labels, label_fn: who holds the labels (see the module docstring).
        pretrain, pretrain_epochs: data the server may use itself; before round 1 the server
            trains the whole model on it for ``pretrain_epochs`` epochs.
        leakage: measure the label-leakage attacks' AUC each round (binary labels only) on at
            most ``leak_examples`` returned gradients, and the distance correlation of each batch.
        timeout: seconds a client may take to answer one message.
        weight_cap: the most weight a client's claimed example count gives its client-part
            update under SplitFed (:class:`~shoal.algorithms.influence.WeightCap`; ``None``:
            uncapped); the vanilla schedule applies each update in turn and weighs none.
        seed: the run's seed.
    """

    def __init__(self, split: SplitModel, loss_fn: LossFn, *, schedule: Schedule = "vanilla",
                 epochs: int = 1, batch_size: int = 32, optimizer: OptimizerFn | None = None,
                 max_steps: int | None = None, protections: Sequence[CutStage] = (),
                 pipeline: Pipeline | None = None, server_opt: ServerOpt | None = None,
                 cohort: Cohort | None = None, labels: Literal["client", "server"] = "client",
                 label_fn: LabelFn | None = None, pretrain: ArrayData | None = None,
                 pretrain_epochs: int = 1, leakage: bool = True, leak_examples: int = 4096,
                 timeout: float | None = None, weight_cap: WeightCap | None = None,
                 seed: int = 0):
        if schedule not in ("vanilla", "splitfed"):
            raise ConfigError(f"SplitLearning: schedule must be 'vanilla' or 'splitfed' "
                              f"(got {schedule!r}).")
        if labels not in ("client", "server"):
            raise ConfigError(f"SplitLearning: labels must be 'client' or 'server' "
                              f"(got {labels!r}).")
        if labels == "server" and split.ushaped:
            raise ConfigError("SplitLearning: a U-shaped model keeps the labels on the client; "
                              "use labels='client', or cut the model once.")
        if labels == "server" and label_fn is None:
            raise ConfigError("SplitLearning: labels='server' needs label_fn(client_id, ids) "
                              "-> labels, the server's own labels.")
        for name, value in (("epochs", epochs), ("batch_size", batch_size),
                            ("pretrain_epochs", pretrain_epochs)):
            if value < 1:
                raise ConfigError(f"SplitLearning: {name} must be >= 1 (got {value}).")
        if weight_cap is not None and schedule != "splitfed":
            raise ConfigError("SplitLearning: weight_cap applies to the splitfed schedule (the "
                              "vanilla schedule weighs no update); pass weight_cap=None.")
        if max_steps is not None and max_steps < 1:
            raise ConfigError(f"SplitLearning: max_steps must be >= 1 or None "
                              f"(got {max_steps}).")
        for p in protections:
            if not isinstance(p, CutStage):
                raise ConfigError(f"SplitLearning: protection {p!r} is a {type(p).__name__}, "
                                  "expected a CutStage (e.g. GradientNoise(1.0)).")
        self.split = split
        self.loss_fn = loss_fn
        self.schedule: Schedule = schedule
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.01)
        self.max_steps = max_steps
        self.protections = tuple(protections)
        self.pipeline = pipeline if pipeline is not None else Pipeline()
        self.server_opt = server_opt if server_opt is not None else sgd(1.0)
        self.cohort = cohort if cohort is not None else Cohort()
        self.labels = labels
        self.label_fn = label_fn
        self.pretrain = pretrain
        self.pretrain_epochs = pretrain_epochs
        self.leakage = leakage
        self.leak_examples = leak_examples
        # Label leakage is measured on what crosses the cut: an observer of the transport.
        self.label_leakage = (LabelLeakage(self._labels_of, leak_examples)
                              if leakage and not split.ushaped else None)
        self.timeout = timeout
        self.weight_cap = weight_cap
        self.seed = seed
        self._server: nn.Module | None = None

    def __repr__(self) -> str:
        shape = "U-shaped" if self.split.ushaped else "cut"
        return (f"SplitLearning({self.schedule}, {shape} after {self.split.cut!r}"
                f"{'/' + self.split.head_cut if self.split.head_cut else ''}, "
                f"protections={list(self.protections)})")

    # -- coordinator side -----------------------------------------------------------------

    def init(self, params: Params) -> SplitState:
        """The state before round 1 (after the server's pre-training, if any)."""
        params = tree.clone(params)
        if self.pretrain is not None and len(self.pretrain) > 0:
            update = local_sgd(self.split.model, self.loss_fn, epochs=self.pretrain_epochs,
                               batch_size=self.batch_size, optimizer=self.optimizer)
            info = ClientInfo(COORDINATOR, 0, derive_seed(self.seed, "split.pretrain"))
            result = update(params, self.pretrain, info)
            params = tree.add(params, result.update)
        client = self.split.client_params(params)
        return SplitState(params, self.server_opt.init(client), self.pipeline.init())

    def params(self, state: SplitState) -> Params:
        """The full model's params."""
        return state.params

    def client_seed(self, round: int, client_id: str) -> int:
        """The seed of ``client_id``'s randomness in ``round`` (batches, noise)."""
        return derive_seed(self.seed, "client", round, client_id)

    def server_module(self) -> nn.Module:
        """The coordinator's private copy of the server part (made on first use)."""
        if self._server is None:
            self._server = copy.deepcopy(self.split.server)
        return self._server

    def round(self, state: SplitState, transport: Transport,
              round: int) -> tuple[SplitState, RoundReport]:
        """One round: every sampled client's data once per epoch; see the module docstring."""
        chosen = self.cohort.sample(transport.nodes(), self.seed, round)
        report = RoundReport(round)
        rlog = _RoundLog()
        leak = self.label_leakage
        if leak is not None:
            if leak not in transport.observers:
                transport.observe(leak)
            leak.figures()  # start the round afresh
        server = self.server_module()
        tree.load_params_(server, self.split.server_params(state.params))
        server.train()
        opt = self.optimizer([p for p in server.parameters() if p.requires_grad])
        client_params = self.split.client_params(state.params)
        new_state = state
        configs = self.pipeline.client_configs(state.stage_states)
        if self.schedule == "vanilla":
            for cid in chosen:
                turn = self._begin(transport, [cid], client_params, round, [], report)
                for step in range(turn[0].steps if turn else 0):
                    turn = self._step(transport, turn, server, opt, round, step, report, rlog)
                    if not turn:
                        break
                for _cid, update, _w in self._end(transport, turn, client_params, round, report):
                    client_params = tree.add(client_params, update)
            new_state = SplitState({**state.params, **tree.params_of(server), **client_params},
                                   state.opt_state, state.stage_states)
        else:
            turns = self._begin(transport, chosen, client_params, round, configs, report)
            for step in range(max((t.steps for t in turns), default=0)):
                active = [t for t in turns if step < t.steps]
                survivors = self._step(transport, active, server, opt, round, step, report,
                                       rlog)
                turns = [t for t in turns if step >= t.steps or t in survivors]
            reduced, count = self._end_splitfed(transport, turns, client_params, configs, round,
                                                report)
            new_client = client_params
            stage_states, opt_state = state.stage_states, state.opt_state
            if reduced is None:
                report.failed = f"no client finished the round ({len(chosen)} sampled)"
            else:
                info = RoundInfo(round, self.seed, len(chosen), count, len(transport.nodes()))
                aggregate, stage_states, stage_metrics = self.pipeline.finish(
                    reduced, state.stage_states, info)
                report.metrics.update(stage_metrics)
                if tree.is_finite(aggregate):
                    new_client, opt_state = self.server_opt.apply(client_params, aggregate,
                                                                  state.opt_state)
                else:
                    report.failed = "the averaged client update is not finite; client part kept"
            new_state = SplitState({**state.params, **tree.params_of(server), **new_client},
                                   opt_state, stage_states)
        self._metrics(report, rlog, chosen)
        if leak is not None:
            report.metrics.update(leak.figures())
        return new_state, report

    def _ask(self, transport: Transport, messages: list[Message],
             report: RoundReport) -> list[Message | None]:
        """Send ``messages``; the replies, ``None`` (and the client dropped) where one failed."""
        out: list[Message | None] = []
        for req, rep in zip(messages, transport.request(messages, self.timeout), strict=True):
            reason = reply_problem(req, rep)
            if reason is not None:
                self._drop(report, req.dst, reason)
                out.append(None)
            else:
                out.append(rep)
        return out

    @staticmethod
    def _drop(report: RoundReport, client: str, reason: str) -> None:
        report.dropped.setdefault(client, reason)
        log.warning("round %d: dropped %s: %s", report.round, client, reason)

    def _begin(self, transport: Transport, clients: Sequence[str], client_params: Params,
               round: int, configs: list[dict[str, Any]], report: RoundReport) -> list[_Turn]:
        msgs = [Message("split.begin", COORDINATOR, cid, round, client_params,
                        {"stages": configs}) for cid in clients]
        turns = []
        for req, rep in zip(msgs, self._ask(transport, msgs, report), strict=True):
            if rep is None:
                continue
            steps = rep.config.get("steps")
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                self._drop(report, req.dst, f"split.begin: steps must be an integer >= 0, "
                                            f"got {steps!r}")
                continue
            turns.append(_Turn(req.dst, steps))
        return turns

    def _labels(self, turn: _Turn, rep: Message, n: int) -> Tensor:
        if self.labels == "server":
            ids = rep.tensors.get("ids")
            if ids is None or ids.dtype != torch.int64 or tuple(ids.shape) != (n,):
                raise UpdateError(f"split.forward from {turn.client!r}: expected {n} int64 "
                                  f"example ids, got {None if ids is None else ids.shape}.")
            assert self.label_fn is not None
            return self.label_fn(turn.client, ids)
        y = rep.tensors.get("labels")
        if y is None or y.shape[:1] != (n,):
            raise UpdateError(f"split.forward from {turn.client!r}: expected labels for the "
                              f"{n} examples of the batch, got "
                              f"{None if y is None else tuple(y.shape)}.")
        return y

    def _labels_of(self, reply: Message) -> Tensor | None:
        """The true labels of the batch a ``split.forward`` reply belongs to (for the
        label-leakage measure): sent with it, or the server's own."""
        if self.labels == "server":
            ids = reply.tensors.get("ids")
            if ids is None or ids.dtype != torch.int64 or ids.dim() != 1:
                return None
            assert self.label_fn is not None
            return self.label_fn(reply.src, ids)
        return reply.tensors.get("labels")

    def _step(self, transport: Transport, turns: list[_Turn], server: nn.Module,
              opt: torch.optim.Optimizer, round: int, step: int, report: RoundReport,
              rlog: _RoundLog) -> list[_Turn]:
        """One batch of every client in ``turns``; the clients still in the round."""
        fwd = [Message("split.forward", COORDINATOR, t.client, round, config={"step": step})
               for t in turns]
        live: list[tuple[_Turn, Tensor, Tensor | None]] = []
        for turn, rep in zip(turns, self._ask(transport, fwd, report), strict=True):
            if rep is None:
                continue
            try:
                acts = check_activations(self.split, rep.tensors.get("activations"),
                                         sender=turn.client)
                y = None if self.split.ushaped else self._labels(turn, rep, acts.shape[0])
            except UpdateError as e:
                self._drop(report, turn.client, str(e))
                continue
            live.append((turn, acts.detach().clone().requires_grad_(True), y))
        if not live:
            return []
        opt.zero_grad(set_to_none=True)
        outputs = [server(a) for _, a, _ in live]
        if self.split.ushaped:
            live, outputs, grads = self._heads(transport, live, outputs, round, step, report,
                                               rlog)
            if not live:
                return []
            total = float(sum(a.shape[0] for _, a, _ in live))
            torch.autograd.backward(outputs, [g * (a.shape[0] / total)
                                              for g, (_, a, _) in zip(grads, live, strict=True)])
        else:
            total = float(sum(a.shape[0] for _, a, _ in live))
            losses = [self.loss_fn(out, y) for out, (_, _, y) in zip(outputs, live, strict=True)
                      if y is not None]
            weighted = torch.stack([loss * (a.shape[0] / total)
                                    for loss, (_, a, _) in zip(losses, live, strict=True)]).sum()
            weighted.backward()
            rlog.loss += sum(float(loss.detach()) * a.shape[0]
                             for loss, (_, a, _) in zip(losses, live, strict=True))
        opt.step()
        back = []
        sizes = [a.shape[0] for _, a, _ in live]
        for (turn, a, _), n in zip(live, sizes, strict=True):
            assert a.grad is not None
            g = a.grad * (total / n)
            ctx = CutContext(turn.client, round, step, self.client_seed(round, turn.client))
            for p in self.protections:
                g = p.gradient(g, ctx)
            back.append(Message("split.backward", COORDINATOR, turn.client, round,
                                {"grad": g}, {"step": step}))
        survivors = []
        for (turn, _, _), n, rep in zip(live, sizes, self._ask(transport, back, report),
                                        strict=True):
            if rep is None:
                continue
            rlog.examples += n
            turn.weight += n
            if "dcor" in rep.metrics:
                rlog.dcor.append(rep.metrics["dcor"])
            survivors.append(turn)
        rlog.steps += 1
        return survivors

    def _heads(self, transport: Transport, live: list[tuple[_Turn, Tensor, Tensor | None]],
               outputs: list[Tensor], round: int, step: int, report: RoundReport,
               rlog: _RoundLog,
               ) -> tuple[list[tuple[_Turn, Tensor, Tensor | None]], list[Tensor], list[Tensor]]:
        """U-shaped: send the server's outputs to the clients' heads; the clients that answered
        with a valid gradient, their outputs and those gradients."""
        msgs = [Message("split.head", COORDINATOR, t.client, round, {"activations": o.detach()},
                        {"step": step}) for (t, _, _), o in zip(live, outputs, strict=True)]
        kept, kept_out, grads = [], [], []
        for item, out, rep in zip(live, outputs, self._ask(transport, msgs, report),
                                  strict=True):
            if rep is None:
                continue
            try:
                g = check_activations(self.split, rep.tensors.get("grad"), sender=item[0].client,
                                      where="head_cut")
                if g.shape != out.shape:
                    raise UpdateError(
                        f"gradient from {item[0].client!r} at the cut after layer "
                        f"{self.split.describe(str(self.split.head_cut))}: shape "
                        f"{tuple(g.shape)}, expected {tuple(out.shape)}.")
            except UpdateError as e:
                self._drop(report, item[0].client, str(e))
                continue
            kept.append(item)
            kept_out.append(out)
            grads.append(g)
            rlog.loss += rep.metrics.get("loss", math.nan) * out.shape[0]
        return kept, kept_out, grads

    def _end(self, transport: Transport, turns: list[_Turn], client_params: Params, round: int,
             report: RoundReport) -> Iterator[tuple[str, Params, float]]:
        """Vanilla: each client's update of the client part, checked like any reply."""
        msgs = [Message("split.end", COORDINATOR, t.client, round) for t in turns]
        for req, rep in zip(msgs, transport.request(msgs, self.timeout), strict=True):
            reason = reply_problem(req, rep, template=client_params, weight=True)
            if reason is not None:
                self._drop(report, req.dst, reason)
                continue
            yield req.dst, rep.tensors, float(rep.config["weight"])

    def _end_splitfed(self, transport: Transport, turns: list[_Turn], client_params: Params,
                      configs: list[dict[str, Any]], round: int,
                      report: RoundReport) -> tuple[Params | None, int]:
        """SplitFed: the clients' updates of the client part folded as FedAvg folds a round's
        replies (validation, coordinator-side stages, the pipeline's reducer)."""
        msgs = [Message("split.end", COORDINATOR, t.client, round) for t in turns]
        fold = RoundFold(self.pipeline, client_params, configs, round, self.seed,
                         weight_cap=self.weight_cap)
        part = transport.collect(msgs, fold, self.timeout)
        for _, dst, reason in part.dropped:
            self._drop(report, dst, reason)
        if self.weight_cap is not None:
            report.metrics["round/weights_capped"] = float(part.capped)
        return fold.finish(part)

    def _metrics(self, report: RoundReport, rlog: _RoundLog, chosen: Sequence[str]) -> None:
        m = report.metrics
        m["round/sampled"] = float(len(chosen))
        m["round/dropped"] = float(len(report.dropped))
        m["round/replied"] = float(len(chosen) - len(report.dropped))
        m["train/examples"] = float(rlog.examples)
        m["train/steps"] = float(rlog.steps)
        if rlog.examples:
            m["train/loss"] = rlog.loss / rlog.examples
        if rlog.dcor:
            m["leak/dcor"] = sum(rlog.dcor) / len(rlog.dcor)

    # -- client side ----------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The client's side: one handler per message kind of :data:`KINDS`."""
        return {"split.begin": self.handle_begin, "split.forward": self.handle_forward,
                "split.head": self.handle_head, "split.backward": self.handle_backward,
                "split.end": self.handle_end}

    def client_modules(self) -> nn.ModuleList:
        """A fresh private copy of the client's parts (each client trains its own)."""
        return copy.deepcopy(self.split.client_modules())

    def handle_begin(self, message: Message, context: NodeContext) -> Message:
        """Load the client part sent, and plan the round's batches."""
        data = train_data(context)
        info = ClientInfo(context.node_id, message.round,
                          self.client_seed(message.round, context.node_id), message.config)
        parts = self.client_modules()
        missing = [k for k in self.split.client_keys() if k not in message.tensors]
        if missing:
            raise RuntimeError(f"split.begin carries no params for {', '.join(missing[:4])} of "
                               "the client part")
        for part in parts:
            tree.load_params_(part, {k: message.tensors[k] for k in tree.params_of(part)})
        parts.train()
        per_epoch = math.ceil(len(data) / self.batch_size)
        steps = per_epoch * self.epochs
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        generator = torch_generator(info.seed, "batches")
        rows = itertools.chain.from_iterable(
            data.batch_rows(self.batch_size, generator) for _ in range(self.epochs))
        context.state["split"] = {
            "parts": parts, "info": info, "start": tree.clone(message.tensors), "rows": rows, "step": 0,
            "steps": steps, "data": data, "examples": 0,
            "opt": self.optimizer([p for p in parts.parameters() if p.requires_grad]),
        }
        return message.reply(config={"steps": steps})

    def _session(self, message: Message, context: NodeContext) -> dict[str, Any]:
        s = context.state.get("split")
        if s is None or s["info"].round != message.round:
            raise RuntimeError(f"{message.kind} in round {message.round} before split.begin "
                               "of that round")
        step = message.config.get("step", s["step"])
        if step != s["step"]:
            raise RuntimeError(f"{message.kind} for step {step}, but this client is at step "
                               f"{s['step']}")
        return s

    def handle_forward(self, message: Message, context: NodeContext) -> Message:
        """Run the bottom on the next batch; send its (protected) activations."""
        s = self._session(message, context)
        rows = next(s["rows"])
        data: ArrayData = s["data"]
        x, y = data.x[rows], data.y[rows]
        parts = s["parts"]
        s["opt"].zero_grad(set_to_none=True)
        acts = parts[0](x)
        s["batch"] = (x, y, acts)
        ctx = CutContext(context.node_id, message.round, s["step"], s["info"].seed)
        sent = acts.detach()
        for p in self.protections:
            sent = p.activations(sent, ctx)
        tensors = {"activations": sent}
        if not self.split.ushaped:
            tensors.update({"ids": rows.clone()} if self.labels == "server" else {"labels": y})
        return message.reply(tensors=tensors, config={"step": s["step"]})

    def handle_head(self, message: Message, context: NodeContext) -> Message:
        """U-shaped: run the head and the loss on the server's output; send its gradient."""
        s = self._session(message, context)
        _, y, _ = s["batch"]
        h = message.tensors["activations"].detach().clone().requires_grad_(True)
        loss = self.loss_fn(s["parts"][1](h), y)
        loss.backward()
        assert h.grad is not None
        return message.reply(tensors={"grad": h.grad}, metrics={"loss": float(loss.detach())})

    def handle_backward(self, message: Message, context: NodeContext) -> Message:
        """Back-propagate the gradient received (plus the protections' loss terms); step."""
        s = self._session(message, context)
        x, _, acts = s["batch"]
        g = message.tensors["grad"]
        if g.shape != acts.shape:
            raise RuntimeError(f"split.backward: gradient of shape {tuple(g.shape)} for "
                               f"activations of shape {tuple(acts.shape)}")
        extra = [t for p in self.protections if (t := p.client_loss(x, acts)) is not None]
        roots, grads = [acts], [g]
        if extra:
            roots.append(torch.stack(extra).sum())
            grads.append(torch.ones((), dtype=acts.dtype))
        torch.autograd.backward(roots, grads)
        s["opt"].step()
        metrics = {}
        if self.leakage:
            with torch.no_grad():
                metrics["dcor"] = float(distance_correlation(x.to(acts.dtype), acts.detach()))
        s["examples"] += len(x)
        s["step"] += 1
        del s["batch"]
        return message.reply(metrics=metrics)

    def handle_end(self, message: Message, context: NodeContext) -> Message:
        """Send the client part's update (``new - start``), through SplitFed's client stages."""
        s = context.state.pop("split", None)
        if s is None:
            raise RuntimeError(f"split.end in round {message.round} before split.begin")
        parts = s["parts"]
        now = {k: v for part in parts for k, v in tree.params_of(part).items()}
        update = tree.sub(now, s["start"])
        if self.schedule == "splitfed":
            update = self.pipeline.client(update, s["info"].config.get("stages", []),
                                          s["info"])
        # The weight FedAvg gives a client: the examples it holds (not the ones this round's
        # steps happened to reach), so a weight cap of assigned examples fits honest clients.
        return message.reply(tensors=update, config={"weight": float(max(len(s["data"]), 1))},
                             metrics={"examples": float(s["examples"])})
