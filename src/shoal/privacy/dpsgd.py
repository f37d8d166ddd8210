"""Sample-level DP: ``DPSGD``, a client update that trains with DP-SGD (Abadi et al. 2016).

Each local step draws a Poisson sample of the client's examples (each one independently with
probability ``q = batch_size / n``), clips every example's gradient to L2 norm ``max_grad_norm``
and adds Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` to their
sum, which is divided by the expected batch size ``q * n``. Opacus computes the per-sample
gradients or their norms (``grad_sample_mode``): ``"bookkeeping"`` (default; Opacus' ghost
clipping finished in one backward pass, see :mod:`shoal.privacy.bookkeeping`), ``"ghost"``
(Opacus' ghost clipping, two backward passes) or ``"hooks"`` (materialises every per-sample
gradient; slow for large linear layers).

A round of DP-SGD on a client is the DP event ``steps`` x PoissonSampled(q, Gaussian(σ)), a
pure function of the client's number of examples (:meth:`DPSGD.event`). A client's accountant
is the composition of that event over the rounds the client took part in; since cohorts derive
from the run's seed, that ledger is rebuilt exactly after a resume (see
:class:`shoal.privacy.budget.SampleLevelLedger`).

The noise and the Poisson batch selection are the client's secret: they come from a keystream
keyed by the operating system (:mod:`shoal.privacy.secure_random`), never from ``info.seed``,
which the coordinator and every holder of the config can compute — with the noise known, the
update is the noise-free one. ``reproducible=True`` draws them from ``info.seed`` instead, for
research that wants bit-identical reruns (and is then not private against the coordinator).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any, Literal

import dp_accounting
import torch
from opacus.grad_sample.utils import get_gsm_class
from opacus.optimizers import get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import Tensor, nn

from .. import tree
from ..client import LossFn, OptimizerFn
from ..data.arrays import ArrayData
from ..errors import ClientError, ConfigError
from ..tree import Params
from ..types import ClientInfo, ClientResult
from .accounting import gaussian_event
from .bookkeeping import BookKeepingModule
from .models import check_dp_model
from .secure_random import privacy_generator

__all__ = ["DPSGD", "GradSampleMode", "dp_sgd"]

GradSampleMode = Literal["bookkeeping", "ghost", "hooks"]


class _PerSampleLoss:
    """``loss_fn`` as a criterion with a ``reduction`` attribute, which Opacus' ghost clipping
    sets to ``"none"`` to get one loss per example."""

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn
        self.reduction = "mean"

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        return self.loss_fn(output, target, reduction=self.reduction)  # type: ignore[call-arg]


class DPSGD:
    """Local DP-SGD with Poisson sampling, per-sample clipping and Gaussian noise.

    Args:
        model: the architecture (checked by :func:`check_dp_model`: BatchNorm is refused).
        loss_fn: ``loss_fn(output, target, reduction=...)``, e.g. ``F.cross_entropy``.
        noise_multiplier: σ, the noise's standard deviation over ``max_grad_norm``.
        max_grad_norm: C, the per-example clipping norm.
        batch_size: the expected batch size; the sampling rate is ``batch_size / n``.
        epochs: expected passes over the data per round: ``ceil(epochs * n / batch_size)``
            steps, at most ``max_steps`` when set.
        optimizer: the torch optimizer (default SGD lr 0.01).
        grad_sample_mode: how Opacus gets per-sample gradient norms.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, noise_multiplier: float,
                 max_grad_norm: float, batch_size: int = 64, epochs: int = 1,
                 max_steps: int | None = None, optimizer: OptimizerFn | None = None,
                 grad_sample_mode: GradSampleMode = "bookkeeping", reproducible: bool = False):
        if not noise_multiplier > 0:
            raise ConfigError(f"dp_sgd: noise_multiplier must be > 0 (got {noise_multiplier}).")
        if not max_grad_norm > 0:
            raise ConfigError(f"dp_sgd: max_grad_norm must be > 0 (got {max_grad_norm}).")
        if batch_size < 1 or epochs < 1:
            raise ConfigError(f"dp_sgd: batch_size and epochs must be >= 1 "
                              f"(got {batch_size}, {epochs}).")
        if max_steps is not None and max_steps < 1:
            raise ConfigError(f"dp_sgd: max_steps must be >= 1 or None (got {max_steps}).")
        if grad_sample_mode not in ("bookkeeping", "ghost", "hooks"):
            raise ConfigError(f"dp_sgd: grad_sample_mode must be 'bookkeeping', 'ghost' or "
                              f"'hooks' (got {grad_sample_mode!r}).")
        check_dp_model(model)
        self.model = model
        self.loss_fn = loss_fn
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.batch_size = batch_size
        self.epochs = epochs
        self.max_steps = max_steps
        self.optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.01)
        self.grad_sample_mode = grad_sample_mode
        self.reproducible = reproducible
        self._wrapped: nn.Module | None = None

    def __repr__(self) -> str:
        return (f"dp_sgd(noise_multiplier={self.noise_multiplier:g}, "
                f"max_grad_norm={self.max_grad_norm:g}, batch_size={self.batch_size}, "
                f"epochs={self.epochs}, grad_sample_mode={self.grad_sample_mode!r}"
                f"{', reproducible=True' if self.reproducible else ''})")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_wrapped": None}  # the Opacus wrapper is a per-process cache

    # -- accounting: pure functions of the client's size -------------------------------------

    def sampling_rate(self, num_examples: int) -> float:
        """q: the probability that an example is in a step's batch."""
        return min(1.0, self.batch_size / max(num_examples, 1))

    def steps(self, num_examples: int) -> int:
        """Local steps per round for a client with ``num_examples`` examples."""
        s = math.ceil(self.epochs / self.sampling_rate(num_examples))
        return min(s, self.max_steps) if self.max_steps is not None else s

    def event(self, num_examples: int) -> dp_accounting.DpEvent:
        """The DP event of one round of this client's training."""
        return gaussian_event(self.noise_multiplier, self.sampling_rate(num_examples),
                              self.steps(num_examples))

    # -- training ----------------------------------------------------------------------------

    def wrapped(self) -> nn.Module:
        """The Opacus-wrapped private replica of ``model`` (made on first use)."""
        if self._wrapped is None:
            replica = copy.deepcopy(self.model)
            if self.grad_sample_mode in ("ghost", "bookkeeping"):
                cls = (BookKeepingModule if self.grad_sample_mode == "bookkeeping"
                       else get_gsm_class("ghost"))
                self._wrapped = cls(replica, max_grad_norm=self.max_grad_norm,
                                    use_ghost_clipping=True, loss_reduction="mean")
            else:
                self._wrapped = get_gsm_class("hooks")(replica, loss_reduction="mean")
        return self._wrapped

    def __call__(self, params: Params, data: ArrayData, info: ClientInfo) -> ClientResult:
        gsm: Any = self.wrapped()
        tree.load_params_(gsm._module, params)
        gsm.train()
        n = len(data)
        q, steps = self.sampling_rate(n), self.steps(n)
        expected = max(1, round(q * n))
        trainable = [p for p in gsm.parameters() if p.requires_grad]
        kind = "hooks" if self.grad_sample_mode == "hooks" else "ghost"
        noise = privacy_generator(self.reproducible, info.seed, "dp-noise")
        opt = _with_noise(get_optimizer_class("flat", False, kind))(
            self.optimizer(trainable), noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm, expected_batch_size=expected,
            loss_reduction="mean")
        opt.noise_source = noise
        criterion: Any = (DPLossFastGradientClipping(gsm, opt, _PerSampleLoss(self.loss_fn),
                                                      "mean")
                          if self.grad_sample_mode == "ghost" else self.loss_fn)
        gsm.zero_grad(set_to_none=True)
        sampler = privacy_generator(self.reproducible, info.seed, "dp-batches")
        loss_sum, examples, step = 0.0, 0, 0
        try:
            for step in range(steps):  # noqa: B007 (step is reported on error)
                rows = data.index[sampler.random(n) < q]
                opt.zero_grad(set_to_none=True)
                if len(rows) == 0:
                    # An empty Poisson sample: the noisy sum is pure noise.
                    std = self.noise_multiplier * self.max_grad_norm
                    for p in trainable:
                        p.grad = noise.normal(p.shape, std, p.dtype) / expected
                    opt.original_optimizer.step()
                    continue
                xb, yb = data.x[rows], data.y[rows]
                if self.grad_sample_mode == "bookkeeping":
                    loss = self._bookkeeping_backward(gsm, xb, yb)
                else:
                    loss = criterion(gsm(xb), yb)
                    loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(rows)
                examples += len(rows)
        except Exception as e:
            raise ClientError(
                f"client {info.client_id!r} failed in round {info.round} at DP-SGD step {step}: "
                f"{type(e).__name__}: {e}",
                client=info.client_id, round=info.round, step=step,
            ) from e
        state = gsm._module.state_dict()
        update = {k: state[k].detach() - v for k, v in params.items()}
        metrics = {"train/loss": loss_sum / max(examples, 1), "train/steps": float(steps),
                   "train/examples": float(examples), "dp/sampling_rate": q,
                   "dp/noise_multiplier": self.noise_multiplier}
        return ClientResult(update=update, weight=float(n), metrics=metrics)


    def _bookkeeping_backward(self, gsm: Any, xb: Tensor, yb: Tensor) -> Tensor:
        """One backward pass for the norms, then the clipped sum from what it kept.

        Autograd is asked only for each layer's smallest parameter (a bias where there is one):
        that makes every layer's output gradient (which the hooks record) without computing a
        weight gradient that the clipped sum replaces, or the input's gradient."""
        loss = self.loss_fn(gsm(xb), yb)  # mean over the batch
        with warnings.catch_warnings():  # the entry layers' hooks fire on output gradients:
            warnings.filterwarnings("ignore", "Full backward hook is firing")  # as intended
            torch.autograd.grad(loss, gsm.probes())
        gsm.clip_and_sum_()
        return loss


_NOISY: dict[type, type] = {}


def _with_noise(base: type) -> type:
    """``base`` (an Opacus DP optimizer class) drawing its noise from ``noise_source`` (a
    :class:`~shoal.privacy.secure_random.SecureGenerator`) instead of a torch generator."""
    cls = _NOISY.get(base)
    if cls is None:
        def add_noise(self: Any) -> None:
            std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) \
                * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = self.noise_source.normal(p.summed_grad.shape, std, p.summed_grad.dtype)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

        cls = _NOISY[base] = type(f"Secret{base.__name__}", (base,), {"add_noise": add_noise})
    return cls


def dp_sgd(model: nn.Module, loss_fn: LossFn, *, noise_multiplier: float,
           max_grad_norm: float, batch_size: int = 64, epochs: int = 1,
           max_steps: int | None = None, optimizer: OptimizerFn | None = None,
           grad_sample_mode: GradSampleMode = "bookkeeping", reproducible: bool = False) -> DPSGD:
    """A DP-SGD client update; see :class:`DPSGD`.

    >>> update_fn = dp_sgd(model, F.cross_entropy, noise_multiplier=1.1, max_grad_norm=1.0,
    ...                    batch_size=64, optimizer=partial(torch.optim.SGD, lr=0.1))
    """
    return DPSGD(model, loss_fn, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                 batch_size=batch_size, epochs=epochs, max_steps=max_steps, optimizer=optimizer,
                 grad_sample_mode=grad_sample_mode, reproducible=reproducible)
