"""``Centralized``: the baseline every result is compared with.

Everyone uploads their data to one server, which trains the same model with the same local
optimizer and batch size. Round ``r`` of the baseline trains on as many examples as round ``r``
of the federated run it is compared with, so the two accuracy curves are plotted against the
same number of training examples seen, and the gap is what federating cost.

It is an ``Algorithm`` like the others, so the same loop, evaluation, logging and checkpointing
apply. Pooling the data is its conversation: in its first round the server asks every node for
its training examples (``"centralized.upload"``) and trains on what arrives, so the upload's
bytes are counted per link like any other traffic (and an observer sees the raw data cross, as
it would). A resumed run uploads again in its first round: the server kept no copy. Given
``data`` directly, it trains on that and nothing is uploaded.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import tree
from ..algorithm import RoundReport
from ..client import LossFn, OptimizerFn
from ..data.arrays import ArrayData
from ..errors import ConfigError
from ..message import COORDINATOR, Message
from ..node import Handler, NodeContext
from ..seeding import torch_generator
from ..transport import Transport
from ..tree import Params
from ..validation import reply_problem
from .fedavg import train_data

__all__ = ["UPLOAD", "Centralized", "CentralizedState"]

log = logging.getLogger(__name__)


@dataclass
class CentralizedState:
    """Params, the torch optimizer's ``state_dict`` and where the data stream stands."""

    params: Params
    opt_state: dict[Any, Any] = field(default_factory=dict)
    epoch: int = 0
    offset: int = 0


UPLOAD = "centralized.upload"
"""The message kind of a node's data upload."""


class Centralized:
    """Train ``model`` on pooled data for ``examples_per_round[r - 1]`` examples in round r.

    ``data`` is the pool; ``None`` pools the nodes' training data through the transport in the
    first round (see the module docstring). The pooled data is visited in epochs, each a fresh
    permutation drawn from ``seed``; a round stops at the first batch boundary at or past its
    example budget. ``examples_per_round`` is one number for every round, or one per round
    (taken from a federated run's history).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: ArrayData | None = None, *,
                 examples_per_round: int | Sequence[int], batch_size: int = 32,
                 optimizer: OptimizerFn | None = None, seed: int = 0):
        if data is not None and len(data) == 0:
            raise ConfigError("Centralized: the pooled data set is empty.")
        if batch_size < 1:
            raise ConfigError(f"Centralized: batch_size must be >= 1 (got {batch_size}).")
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.examples_per_round = examples_per_round
        self.batch_size = batch_size
        self.optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.01)
        self.seed = seed
        self._replica: nn.Module | None = None

    def __repr__(self) -> str:
        pool = "uploaded" if self.data is None else len(self.data)
        return f"Centralized(examples={pool}, batch_size={self.batch_size})"

    def budget(self, round: int) -> int:
        """How many examples round ``round`` trains on."""
        e = self.examples_per_round
        if isinstance(e, int):
            return e
        return int(e[round - 1]) if round <= len(e) else int(e[-1])

    def init(self, params: Params) -> CentralizedState:
        """The state before round 1."""
        return CentralizedState(tree.clone(params))

    def params(self, state: CentralizedState) -> Params:
        """The model's params."""
        return state.params

    def handlers(self) -> dict[str, Handler]:
        """The nodes' side: upload their training examples when asked."""
        return {UPLOAD: self.handle_upload}

    @staticmethod
    def handle_upload(message: Message, context: NodeContext) -> Message:
        """Send every training example this node holds (what centralizing means)."""
        x, y = train_data(context).tensors()
        return message.reply(tensors={"x": x, "y": y})

    def pool(self, transport: Transport, round: int, report: RoundReport) -> ArrayData:
        """Ask every node for its training examples; the pool, in node order."""
        requests = [Message(UPLOAD, COORDINATOR, n, round) for n in transport.nodes()]
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        for req, rep in zip(requests, transport.stream(requests), strict=True):
            reason = reply_problem(req, rep)
            x, y = rep.tensors.get("x"), rep.tensors.get("y")
            if reason is None and (x is None or y is None or len(x) != len(y)
                                   or (xs and (x.shape[1:], x.dtype, y.shape[1:], y.dtype)
                                       != (xs[0].shape[1:], xs[0].dtype, ys[0].shape[1:],
                                           ys[0].dtype))):
                reason = (f"{UPLOAD} reply must hold tensors 'x' and 'y' with one row per "
                          "example, shaped like the other nodes'")
            if reason is not None or x is None or y is None:
                report.dropped[req.dst] = str(reason)
                log.warning("round %d: no data from %s: %s", round, req.dst, reason)
                continue
            xs.append(x)
            ys.append(y)
        if not xs:
            raise ConfigError("Centralized: no node uploaded any data; nothing to train on.")
        return ArrayData.of(torch.cat(xs), torch.cat(ys))

    def round(self, state: CentralizedState, transport: Transport,
              round: int) -> tuple[CentralizedState, RoundReport]:
        """Train on the next ``budget(round)`` examples of the pooled stream (pooling the
        nodes' data first when this process has none yet)."""
        report = RoundReport(round)
        if self.data is None:
            self.data = self.pool(transport, round, report)
            report.metrics["centralized/uploaded_examples"] = float(len(self.data))
        if self._replica is None:
            self._replica = copy.deepcopy(self.model)
        model = self._replica
        tree.load_params_(model, state.params)
        model.train()
        opt = self.optimizer([p for p in model.parameters() if p.requires_grad])
        if state.opt_state:
            opt.load_state_dict(copy.deepcopy(state.opt_state))
        n, budget = len(self.data), self.budget(round)
        epoch, offset, seen, steps = state.epoch, state.offset, 0, 0
        loss_sum = torch.zeros((), dtype=torch.float64)
        order = self._order(epoch)
        while seen < budget:
            if offset >= n:
                epoch, offset = epoch + 1, 0
                order = self._order(epoch)
            rows = order[offset:offset + self.batch_size]
            offset += len(rows)
            xb, yb = self.data.x[rows], self.data.y[rows]
            opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            seen += len(rows)
            steps += 1
        new = CentralizedState(tree.params_of(model), copy.deepcopy(opt.state_dict()),
                               epoch, offset)
        report.metrics.update({"train/loss": float(loss_sum) / max(steps, 1),
                               "train/steps": float(steps), "train/examples": float(seen)})
        return new, report

    def _order(self, epoch: int) -> torch.Tensor:
        assert self.data is not None
        perm = torch.randperm(len(self.data), generator=torch_generator(self.seed, "pool", epoch))
        return self.data.index[perm]
