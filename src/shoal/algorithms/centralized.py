"""``Centralized``: the baseline every result is compared with.

Everyone uploads their data to one server, which trains the same model with the same local
optimizer and batch size. Round ``r`` of the baseline trains on as many examples as round ``r``
of the federated run it is compared with, so the two accuracy curves are plotted against the
same number of training examples seen, and the gap is what federating cost.

It is an ``Algorithm`` like the others (no messages: its ``round`` ignores the transport), so the
same loop, evaluation, logging and checkpointing apply.
"""

from __future__ import annotations

import copy
import functools
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
from ..node import Handler
from ..seeding import torch_generator
from ..transport import Transport
from ..tree import Params

__all__ = ["Centralized", "CentralizedState"]


@dataclass
class CentralizedState:
    """Params, the torch optimizer's ``state_dict`` and where the data stream stands."""

    params: Params
    opt_state: dict[Any, Any] = field(default_factory=dict)
    epoch: int = 0
    offset: int = 0


class Centralized:
    """Train ``model`` on pooled ``data`` for ``examples_per_round[r - 1]`` examples in round r.

    The pooled data is visited in epochs, each a fresh permutation drawn from ``seed``; a round
    stops at the first batch boundary at or past its example budget. ``examples_per_round`` is
    one number for every round, or one per round (taken from a federated run's history).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: ArrayData, *,
                 examples_per_round: int | Sequence[int], batch_size: int = 32,
                 optimizer: OptimizerFn | None = None, seed: int = 0):
        if len(data) == 0:
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
        return f"Centralized(examples={len(self.data)}, batch_size={self.batch_size})"

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
        """None: nobody else takes part."""
        return {}

    def round(self, state: CentralizedState, transport: Transport,
              round: int) -> tuple[CentralizedState, RoundReport]:
        """Train on the next ``budget(round)`` examples of the pooled stream."""
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
        metrics = {"train/loss": float(loss_sum) / max(steps, 1), "train/steps": float(steps),
                   "train/examples": float(seen)}
        return new, RoundReport(round, metrics)

    def _order(self, epoch: int) -> torch.Tensor:
        perm = torch.randperm(len(self.data), generator=torch_generator(self.seed, "pool", epoch))
        return self.data.index[perm]
