"""The SGD step of stacked client params, and linear layers that take it inside the backward pass.

The vectorized executor trains ``C`` clients at once: each param is a stack ``(C, *shape)``.
For a linear layer the weight gradient of client ``c`` is one matrix product,
``x_c^T @ dy_c`` (the layer's input and output gradient). Autograd writes every client's
gradient into a fresh ``(C, out, in)`` tensor and the step then reads it back to add it to the
weights: for a cohort of small MLPs the weight stack is tens of MB, so that round trip through
memory costs as much as the product itself. :class:`SteppedLinear` instead accumulates the
product straight into the weights (``W^T.baddbmm_(x^T, dy, alpha=-lr)``, one BLAS call per
layer and step), inside its own backward pass, the way a hand-written batched loop would.

It is an ``autograd.Function`` with a ``vmap`` rule, so the client update stays one function of
one client's params run under :func:`torch.func.vmap`; only its weight gradient takes the
fused route. Outside ``vmap`` the layer is an ordinary ``nn.Linear`` (same forward, ordinary
gradients). Everything else in the model gets its gradients from autograd and the same
:meth:`SGDStep.apply_` afterwards.

The fused weights are stored transposed, ``(C, in, out)`` in memory (viewed as
``(C, out, in)``), so ``baddbmm_`` writes them in memory order. When steps run eagerly, only
layers of at least :data:`FUSE_MIN_WEIGHTS` weights are worth fusing: for a small layer the
stack stays in cache and the Python of the ``vmap`` rule costs more than it saves; a replayed
step (:mod:`shoal.batched.traced`) runs no such Python, so the vectorized trainer then fuses every
layer it can.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FUSE_MIN_WEIGHTS", "Outer", "SGDStep", "SteppedLinear", "step_linear_layers"]


@dataclass(frozen=True)
class Outer:
    """A batched weight gradient given by its factors: client ``c``'s gradient is
    ``(a[c] @ b[c])^T``, ``a`` ``(k, in, n)``, ``b`` ``(k, n, out)``, never materialised."""

    a: Tensor
    b: Tensor


def _accumulate_(out: Tensor, grad: Tensor | Outer, beta: float, alpha: float) -> None:
    """``out = beta * out + alpha * grad`` in place (``beta == 0``: old values ignored)."""
    if isinstance(grad, Outer):
        out.transpose(-1, -2).baddbmm_(grad.a, grad.b, beta=beta, alpha=alpha)
    elif beta == 0:
        torch.mul(grad, alpha, out=out)
    else:
        if beta != 1:
            out.mul_(beta)
        out.add_(grad, alpha=alpha)


@dataclass
class SGDStep:
    """One local step of ``torch.optim.SGD`` (lr, momentum, weight decay; no dampening) plus
    FedProx's proximal gradient ``mu * (w - w_global)`` and a constant per-client gradient
    correction (SCAFFOLD's ``c - c_i``), on stacked client params in place.

    ``begin(k, first)`` starts a step for the first ``k`` clients of the stack (the ones still
    training); ``apply_(name, p, grad)`` updates ``p`` (``(k, *shape)``, a view of the stack)
    and its momentum buffer. ``anchors`` holds each param's global value ``(1, *shape)``
    (FedProx), ``buffers`` the momentum stacks ``(C, *shape)``, ``corrections`` the gradient
    corrections ``(C, *shape)`` (empty: none).
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    anchors: dict[str, Tensor] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)
    corrections: dict[str, Tensor] = field(default_factory=dict)
    k: int = 0
    first: bool = True

    def begin(self, k: int, first: bool) -> None:
        """Start a step of the first ``k`` clients; ``first``: the first step of the round."""
        self.k, self.first = k, first

    def apply_(self, name: str, p: Tensor, grad: Tensor | Outer) -> None:
        """``p -= lr * d`` with ``d = grad + corr + mu (p - p0) + wd p`` (through the momentum
        buffer when momentum is set), as ``local_sgd`` with ``torch.optim.SGD`` computes it."""
        lr, mom, wd, mu = self.lr, self.momentum, self.weight_decay, self.prox_mu
        corr = self.corrections.get(name)
        with torch.no_grad():
            if not mom:  # p (1 - lr (mu + wd)) + lr mu p0 - lr grad - lr corr
                _accumulate_(p, grad, 1.0 - lr * (mu + wd), -lr)
                if mu:
                    p.add_(self.anchors[name], alpha=lr * mu)
                if corr is not None:
                    p.add_(corr[:self.k], alpha=-lr)
                return
            buf = self.buffers[name][:self.k]
            _accumulate_(buf, grad, 0.0 if self.first else mom, 1.0)
            if corr is not None:
                buf.add_(corr[:self.k])
            if mu:
                buf.add_(p - self.anchors[name], alpha=mu)
            if wd:
                buf.add_(p, alpha=wd)
            p.add_(buf, alpha=-lr)


class _StackedLinearStep(torch.autograd.Function):
    """``y = x @ W^T + b`` for ``k`` clients at once (``x (k, n, in)``, ``W (k, out, in)``);
    the backward pass returns ``dx`` and applies the SGD step to ``W`` and ``b`` in place.
    Called on plain tensors only (inside the vmap rule), so it keeps the classic
    ``forward(ctx, ...)`` form, which ``apply`` does not have to bind by signature."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,
                layer: SteppedLinear) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.layer = layer
        wt = weight.transpose(1, 2)  # (k, in, out)
        return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, None, None, None]:
        x, weight, bias = ctx.saved_tensors
        layer: SteppedLinear = ctx.layer
        dx = torch.bmm(dy, weight) if ctx.needs_input_grad[0] else None  # before W changes
        step = layer.step
        assert step is not None, "SteppedLinear: no SGDStep is bound (see step_linear_layers)"
        step.apply_(layer.weight_name, weight.detach(), Outer(x.transpose(1, 2), dy))
        if bias is not None:
            step.apply_(layer.bias_name, bias.detach(), dy.sum(1))
        return dx, None, None, None


class _LinearFunction(torch.autograd.Function):
    """``F.linear`` with a ``vmap`` rule that routes a batched weight to
    :class:`_StackedLinearStep`; without ``vmap`` an ordinary linear layer."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None,
                layer: SteppedLinear) -> Tensor:
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = dy2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: Tensor, weight: Tensor,
             bias: Tensor | None, layer: SteppedLinear) -> tuple[Tensor, int]:
        x_dim, w_dim, b_dim, _ = in_dims
        if w_dim is None or (bias is not None and b_dim is None):
            raise ValueError("SteppedLinear under vmap needs its weight and bias batched (one "
                             "per client); use nn.Linear for shared weights")
        k = info.batch_size
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(k, *x.shape)
        weight = weight.movedim(w_dim, 0)
        bias = bias.movedim(b_dim, 0) if bias is not None and b_dim is not None else bias
        lead = x.shape[1:-1]  # one client's leading dims, e.g. (B,) or (B, T)
        y = _StackedLinearStep.apply(x.reshape(k, -1, x.shape[-1]), weight, bias, layer)
        return y.reshape(k, *lead, y.shape[-1]), 0


class SteppedLinear(nn.Module):
    """An ``nn.Linear`` (same ``weight``/``bias`` names and forward) whose backward pass under
    ``vmap`` applies :attr:`step` to its stacked weight and bias instead of returning their
    gradients; see the module docstring."""

    def __init__(self, linear: nn.Linear, weight_name: str, bias_name: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_name, self.bias_name = weight_name, bias_name
        self.step: SGDStep | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``x @ weight^T + bias``."""
        return _LinearFunction.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


FUSE_MIN_WEIGHTS = 4096
"""The smallest linear layer (weights per client) :func:`step_linear_layers` fuses by default
(and the vectorized trainer when its steps are not replayed). Below it the weight stack is
small enough to stay in cache, and the fused layer's Python (its ``vmap`` rule and autograd
function: about 0.4 ms a layer and step, measured) costs more than the round trip through
memory it saves."""


def step_linear_layers(model: nn.Module, trainable: Collection[str], step: SGDStep, *,
                       min_weights: int = FUSE_MIN_WEIGHTS) -> list[str]:
    """Replace, in place, every plain ``nn.Linear`` of ``model`` with at least ``min_weights``
    weights whose params are all in ``trainable`` by a :class:`SteppedLinear` bound to
    ``step``; the fused param names."""
    # A layer used twice, or a param shared with another layer (tied weights), gets gradients
    # from several places: it stays an nn.Linear, stepped after autograd like the rest.
    uses: dict[int, int] = {}
    for _, t in model.named_parameters(remove_duplicate=False):
        uses[id(t)] = uses.get(id(t), 0) + 1
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    fused: list[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child.weight.numel() < min_weights \
                    or uses[id(child)] > 1 \
                    or any(uses[id(t)] > 1 for t in child.parameters()):
                continue
            prefix = f"{name}.{child_name}" if name else child_name
            names = [f"{prefix}.weight"] + ([f"{prefix}.bias"] if child.bias is not None else [])
            if not all(n in trainable for n in names):
                continue
            layer = SteppedLinear(child, names[0], f"{prefix}.bias")
            layer.step = step
            setattr(module, child_name, layer)
            fused += names
    return fused
