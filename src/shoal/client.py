"""What a client does with the global model: ``ClientUpdate`` and ``local_sgd``.

A client update is a function ``(params, data, info) -> ClientResult``. It must not keep state
between calls that changes its result: everything random is drawn from ``info.seed``, so the
same client in the same round computes the same update whichever executor runs it, and after
a resume. (State a client must keep between rounds is the algorithm's node state, see
:class:`~shoal.node.NodeStore`.)

What an update can do beyond that it declares by the protocols it implements, which executors
and algorithms ask for (``isinstance``), never by recognising its class: :class:`Batchable`
(it has a batched form that trains a whole cohort at once) and :class:`Placeable` (it can train
on another device).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from . import tree
from .data.arrays import ArrayData
from .errors import ClientError, ConfigError
from .seeding import torch_generator
from .tree import Params
from .types import ClientInfo, ClientResult

__all__ = [
    "Batchable",
    "ClientUpdate",
    "Correctable",
    "LocalSGD",
    "LossFn",
    "OptimizerFn",
    "Placeable",
    "local_sgd",
    "optimizer_fn",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(output, target) -> scalar`` (mean over the batch), e.g. ``F.cross_entropy``."""

OptimizerFn = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
"""Builds a torch optimizer over the given parameters, e.g. ``partial(torch.optim.SGD, lr=0.1)``."""


class ClientUpdate(Protocol):
    """``(params, data, info) -> ClientResult``: what a client does with the global model."""

    def __call__(self, params: Params, data: ArrayData, info: ClientInfo) -> ClientResult: ...


@runtime_checkable
class Batchable(Protocol):
    """A client update with a batched form: ``batched()`` returns a trainer whose
    ``cohort(params, datas, infos, corrections=None)`` trains many clients at once (see
    :class:`~shoal.batched.VectorizedLocalSGD`), or raises a
    :class:`~shoal.errors.ConfigError` / :class:`~shoal.errors.ModelError` saying why this
    update (its optimizer, its model) cannot be batched."""

    def batched(self) -> Any:
        """The batched form of this update (raises saying why there is none)."""
        ...


@runtime_checkable
class Correctable(Protocol):
    """A client update that takes plain SGD steps and can add a constant correction to each
    gradient (what SCAFFOLD needs): ``train(params, data, info, correction)``, the SGD
    ``step_size()`` (raising a :class:`~shoal.errors.ConfigError` when its steps are not plain
    SGD) and the ``trainable()`` param names it trains."""

    def train(self, params: Params, data: ArrayData, info: ClientInfo,
              correction: Params | None = None) -> ClientResult:
        """Train from ``params``, adding ``correction[name]`` to that param's gradient."""
        ...

    def step_size(self) -> float:
        """The learning rate of its plain SGD steps."""
        ...

    def trainable(self) -> list[str]:
        """The names of the params it trains."""
        ...


@runtime_checkable
class Placeable(Protocol):
    """A client update that can train on another device: set ``device``."""

    device: torch.device | None


def optimizer_fn(name: str, **kwargs: Any) -> OptimizerFn:
    """A factory for ``torch.optim.<name>(params, **kwargs)``, checked now, not at first use.

    >>> opt = optimizer_fn("SGD", lr=0.05, momentum=0.9)
    """
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        known = sorted(n for n, c in vars(torch.optim).items()
                       if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
                       and c is not torch.optim.Optimizer)
        raise ConfigError(
            f"optimizer: unknown torch optimizer {name!r}; expected one of {', '.join(known)}."
        )
    try:  # Construct once on a dummy parameter so a bad argument fails here, with its name.
        cls([nn.Parameter(torch.zeros(1))], **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer: torch.optim.{name} rejected {kwargs}: {e}") from e
    return functools.partial(cls, **kwargs)


class LocalSGD:
    """Local training with a torch optimizer: FedAvg's and FedProx's client update.

    Loads the global params into a private replica of ``model``, trains it for ``epochs`` passes
    over the client's data in shuffled mini-batches of ``batch_size`` (at most ``max_steps``
    steps when set), and returns ``new - old`` with weight = number of examples.

    ``prox_mu > 0`` adds FedProx's proximal term ``mu/2 * ||w - w_global||^2`` to the loss
    (Li et al. 2020); its gradient ``mu * (w - w_global)`` is added to the gradients directly.

    ``device`` (``None``: where the params are) is where the replica trains: each batch is
    moved there, and the update comes back on the params' device, so aggregation is unchanged.
    The processes executor sets it to a GPU per worker rank when CUDA is present.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, epochs: int = 1,
                 batch_size: int = 32, optimizer: OptimizerFn | None = None,
                 prox_mu: float = 0.0, max_steps: int | None = None,
                 device: str | torch.device | None = None):
        if epochs < 1:
            raise ConfigError(f"local_sgd: epochs must be >= 1 (got {epochs}).")
        if batch_size < 1:
            raise ConfigError(f"local_sgd: batch_size must be >= 1 (got {batch_size}).")
        if prox_mu < 0:
            raise ConfigError(f"local_sgd: prox_mu must be >= 0 (got {prox_mu}).")
        if max_steps is not None and max_steps < 1:
            raise ConfigError(f"local_sgd: max_steps must be >= 1 or None (got {max_steps}).")
        self.model = model
        self.loss_fn = loss_fn
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.01)
        self.prox_mu = prox_mu
        self.max_steps = max_steps
        self.device = None if device is None else torch.device(device)
        self._replica: nn.Module | None = None

    def __repr__(self) -> str:
        opt = self.optimizer
        opt_s = (f"{opt.func.__name__}({', '.join(f'{k}={v}' for k, v in opt.keywords.items())})"
                 if isinstance(opt, functools.partial) else repr(opt))
        extra = f", prox_mu={self.prox_mu}" if self.prox_mu else ""
        extra += f", max_steps={self.max_steps}" if self.max_steps else ""
        extra += f", device='{self.device}'" if self.device is not None else ""
        return (f"local_sgd(epochs={self.epochs}, batch_size={self.batch_size}, "
                f"optimizer={opt_s}{extra})")

    def __getstate__(self) -> dict[str, Any]:
        # The replica is a cache; worker processes build their own.
        return {**self.__dict__, "_replica": None}

    def replica(self) -> nn.Module:
        """The private copy of the model this update trains in place (made on first use, on
        ``device`` when set)."""
        if self._replica is None:
            self._replica = copy.deepcopy(self.model)
        if self.device is not None:
            self._replica.to(self.device)
        return self._replica

    def step_size(self) -> float:
        """The learning rate of this update's steps when they are plain SGD (no momentum,
        Nesterov, dampening or FedProx term); a ``ConfigError`` saying why otherwise."""
        opt = self.optimizer
        kw = dict(opt.keywords) if isinstance(opt, functools.partial) else {}
        plain = (isinstance(opt, functools.partial) and opt.func is torch.optim.SGD
                 and not opt.args and not kw.get("momentum") and not kw.get("nesterov")
                 and not kw.get("dampening") and not kw.get("maximize"))
        if not plain or self.prox_mu:
            raise ConfigError(
                f"local_sgd: the optimizer is {opt!r}{' with prox_mu' if self.prox_mu else ''}; "
                "SCAFFOLD's control variates (option II) assume plain SGD steps: use "
                "torch.optim.SGD with lr (and weight_decay) only, momentum 0 and prox_mu 0."
            )
        return float(kw.get("lr", 1e-3))

    def trainable(self) -> list[str]:
        """The names of the model's params that require gradients (what training changes)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def batched(self) -> Any:
        """The batched form (:class:`~shoal.batched.VectorizedLocalSGD`), or a ``ConfigError``
        / ``ModelError`` saying why this optimizer or model cannot be batched."""
        from .batched import VectorizedLocalSGD  # the batched form builds on this class

        return VectorizedLocalSGD(self)

    def __call__(self, params: Params, data: ArrayData, info: ClientInfo) -> ClientResult:
        return self.train(params, data, info)

    def train(self, params: Params, data: ArrayData, info: ClientInfo,
              correction: Params | None = None) -> ClientResult:
        """Train from ``params`` on ``data``; ``correction`` (param name -> tensor) is added to
        the gradient of that param before every step (SCAFFOLD's ``c - c_i``)."""
        model = self.replica()
        device = self.device
        tree.load_params_(model, params)
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        trainable = [p for _, p in named]
        anchors = [p.detach().clone() for p in trainable] if self.prox_mu else []
        corr = ([None if correction is None or n not in correction
                 else correction[n].to(p.device) for n, p in named] if correction else [])
        opt = self.optimizer(trainable)
        generator = torch_generator(info.seed, "batches")
        step = 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        examples = 0
        try:
            for _ in range(self.epochs):
                for xb, yb in data.batches(self.batch_size, generator):
                    if device is not None:
                        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                    opt.zero_grad(set_to_none=True)
                    loss = self.loss_fn(model(xb), yb)
                    loss.backward()
                    if self.prox_mu:
                        for p, p0 in zip(trainable, anchors, strict=True):
                            if p.grad is not None:
                                p.grad.add_(p.detach() - p0, alpha=self.prox_mu)
                    for p, c in zip(trainable, corr, strict=False):
                        if c is not None and p.grad is not None:
                            p.grad.add_(c)
                    opt.step()
                    loss_sum += loss.detach()
                    examples += len(yb)
                    step += 1
                    if self.max_steps is not None and step >= self.max_steps:
                        break
                else:
                    continue
                break
        except Exception as e:
            raise ClientError(
                f"client {info.client_id!r} failed in round {info.round} at local step {step}: "
                f"{type(e).__name__}: {e}",
                client=info.client_id, round=info.round, step=step,
            ) from e
        state = model.state_dict()
        update = {k: state[k].detach().to(v.device) - v for k, v in params.items()}
        metrics = {"train/loss": float(loss_sum) / max(step, 1), "train/steps": float(step),
                   "train/examples": float(examples)}
        return ClientResult(update=update, weight=float(len(data)), metrics=metrics)


def local_sgd(model: nn.Module, loss_fn: LossFn, *, epochs: int = 1, batch_size: int = 32,
              optimizer: OptimizerFn | None = None, prox_mu: float = 0.0,
              max_steps: int | None = None, device: str | torch.device | None = None,
              ) -> LocalSGD:
    """FedAvg's client update (FedProx with ``prox_mu > 0``); see :class:`LocalSGD`.

    >>> update_fn = local_sgd(model, F.cross_entropy, epochs=1, batch_size=32,
    ...                       optimizer=partial(torch.optim.SGD, lr=0.05))
    """
    return LocalSGD(model, loss_fn, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                    prox_mu=prox_mu, max_steps=max_steps, device=device)
