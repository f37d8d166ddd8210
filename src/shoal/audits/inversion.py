"""Gradient inversion: how much of a client's *input* its update gives away.

An honest-but-curious coordinator receives every client's update, ``new - old`` after local
training (:class:`~shoal.client.LocalSGD`). For one plain SGD step that is ``-lr`` times the
gradient of the loss on the client's batch (:func:`update_to_gradient`), and a gradient of a
small batch can be turned back into the batch:

* :func:`analytic_recovery` — for a fully connected layer with a bias, the gradient of one
  example is ``dL/dW = (dL/db) x^T``, so every row ``i`` with ``dL/db[i] != 0`` gives the layer's
  input exactly: ``x = dL/dW[i] / dL/db[i]`` (Phong et al. 2017, "Privacy-preserving deep
  learning via additively homomorphic encryption"; used by Geiping et al. 2020). No training, no
  prior: a batch-1 update of a model whose first layer is ``nn.Linear`` hands over its input.
* :func:`invert_gradients` — the optimisation attack: find the input whose gradient matches the
  observed one, by gradient descent on the input through a second-order autograd graph.
  "Deep Leakage from Gradients" (DLG, Zhu et al. 2019) matches with a squared distance; iDLG
  (Zhao et al. 2020) reads the label off the sign of the last layer's bias gradient
  (:func:`infer_label`); "Inverting Gradients" (Geiping et al. 2020) matches with the cosine
  distance, which ignores the gradient's scale (and so works on a multi-step update or a clipped
  one), plus a total-variation prior for images.

:func:`reconstruction_error` and :func:`exact_recovery` score a reconstruction against the truth.

What defeats them: averaging over a batch (the analytic ratio then mixes the examples), and
DP-SGD's clipping and Gaussian noise (:mod:`shoal.privacy.dpsgd`), whose noise dwarfs a single
example's clipped gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..tree import Params

__all__ = [
    "analytic_recovery",
    "exact_recovery",
    "infer_label",
    "invert_gradients",
    "reconstruction_error",
    "update_to_gradient",
]


def _layer_keys(grads: Mapping[str, Tensor], layer: str) -> tuple[str, str]:
    """The weight and bias names of ``layer`` (``"0"`` or ``"0.weight"`` both name it)."""
    for suffix in (".weight", ".bias"):
        if layer.endswith(suffix):
            layer = layer[: -len(suffix)]
    w, b = f"{layer}.weight", f"{layer}.bias"
    missing = [k for k in (w, b) if k not in grads]
    if missing:
        raise KeyError(
            f"analytic_recovery: no {', '.join(repr(k) for k in missing)} in the gradients "
            f"(have {sorted(grads)[:8]}); name a fully connected layer that has a bias."
        )
    return w, b


def analytic_recovery(grads: Mapping[str, Tensor], layer: str, *,
                      threshold: float = 1e-2, atol: float = 1e-12) -> Tensor | None:
    """The input of fully connected ``layer`` (with bias), read off a batch-1 gradient.

    For one example, ``dL/dW = (dL/db) x^T`` (``W`` is ``(out, in)``), so ``x`` is
    ``dL/dW[i] / dL/db[i]`` for any row ``i`` whose bias gradient is non-zero (a ReLU after the
    layer zeroes the rows of inactive units). The rows with ``|dL/db[i]|`` at least
    ``threshold`` times the largest are combined by least squares,
    ``x = sum_i db_i dW_i / sum_i db_i^2`` (an average of the ratios weighted by ``db_i^2``, so
    tiny, noisy denominators count little).

    The ratio does not depend on the gradient's scale: an update (``-lr * grad``) or a sum works
    as well as the gradient itself. For the first layer the result is the flattened model
    input (reshape it to the input's shape). For a batch of ``B > 1`` examples the gradient is
    an average, and the ratio a mixture of the examples' inputs (weighted by their unknown
    ``dL/db``), not any one of them.

    Args:
        grads: gradients (or an update) by parameter name, e.g. ``{"0.weight", "0.bias", ...}``.
        layer: the layer's name, ``"0"`` (or ``"0.weight"``).
        threshold: rows kept, relative to the largest ``|dL/db[i]|``.
        atol: below this, every bias gradient is taken as zero.

    Returns:
        The input, shape ``(in_features,)``; ``None`` when every bias gradient is ~0 (no row
        carries the input).
    """
    wk, bk = _layer_keys(grads, layer)
    dw = grads[wk].detach().double()
    db = grads[bk].detach().double()
    if dw.dim() != 2 or db.dim() != 1 or dw.shape[0] != db.shape[0]:
        raise ValueError(
            f"analytic_recovery: {layer!r} is not a fully connected layer: weight gradient "
            f"{tuple(dw.shape)}, bias gradient {tuple(db.shape)} (expected (out, in), (out,))."
        )
    biggest = float(db.abs().max()) if db.numel() else 0.0
    if not math.isfinite(biggest) or biggest <= atol:
        return None
    rows = db.abs() >= threshold * biggest
    d, w = db[rows], dw[rows]
    x = (d[:, None] * w).sum(0) / (d * d).sum()
    return x.to(grads[wk].dtype)


def update_to_gradient(update: Mapping[str, Tensor], lr: float, steps: int = 1) -> Params:
    """The gradient behind an update: ``-update / (lr * steps)``.

    Exact for one step of plain SGD (no momentum, weight decay or FedProx term): the update is
    then ``-lr * grad``. For ``steps > 1`` it is the *average* gradient along the local
    trajectory, which only approximates the gradient at the global params (each step's gradient
    is taken at different params, on a different batch); an attack on it is an approximation,
    and one with an optimizer other than SGD is further off.
    """
    if not lr > 0:
        raise ValueError(f"update_to_gradient: lr must be > 0 (got {lr}).")
    if steps < 1:
        raise ValueError(f"update_to_gradient: steps must be >= 1 (got {steps}).")
    factor = -1.0 / (lr * steps)
    return {k: v * factor for k, v in update.items()}


def infer_label(grads: Mapping[str, Tensor], layer: str | None = None) -> int:
    """The label of a batch-1 example, from the last layer's gradient (iDLG, Zhao et al. 2020).

    With softmax cross-entropy, the output gradient is ``p - onehot(y)``: negative at the true
    class only. It is the bias gradient of the last layer; without a bias, the weight gradient's
    rows are ``(p_i - y_i) h^T``, whose sums have that sign when the layer's input ``h`` is
    non-negative (after a ReLU or sigmoid). ``layer`` names the last layer (default: the layer
    of the last 1-D ``*.bias`` or 2-D ``*.weight`` in ``grads``' order, which is the model's
    parameter order).
    """
    if layer is None:
        last = [k for k, v in grads.items() if (k.endswith(".bias") and v.dim() == 1)
                or (k.endswith(".weight") and v.dim() == 2)]
        if not last:
            raise ValueError(
                "infer_label: no 1-D bias or 2-D weight gradient to read the label from.")
        layer = last[-1]
    base = layer.removesuffix(".weight").removesuffix(".bias")
    if f"{base}.bias" in grads:
        return int(grads[f"{base}.bias"].argmin())
    return int(grads[f"{base}.weight"].sum(dim=1).argmin())


def _total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference of neighbours along the last two dims (last dim for 1-D)."""
    tv = (x[..., 1:] - x[..., :-1]).abs().mean() if x.shape[-1] > 1 else x.new_zeros(())
    if x.dim() >= 3 and x.shape[-2] > 1:  # (batch, ..., H, W)
        tv = tv + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return tv


def invert_gradients(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                     target_grads: Mapping[str, Tensor], input_shape: Sequence[int],
                     label: int | Tensor | None = None, *, steps: int = 300, lr: float = 0.1,
                     tv: float = 0.0, seed: int = 0, params: Mapping[str, Tensor] | None = None,
                     distance: str = "cosine", bounds: tuple[float, float] | None = None,
                     ) -> Tensor:
    """Reconstruct a batch-1 input from its gradient by matching gradients.

    Starts from Gaussian noise (``torch.Generator`` seeded with ``seed``) and runs ``steps``
    Adam steps of size ``lr`` on the input ``x`` to minimise ``distance(grad(x), target)`` plus
    ``tv`` times the input's total variation. ``grad(x)`` is the gradient of
    ``loss_fn(model(x), label)`` with respect to the parameters named in ``target_grads``,
    computed with :func:`torch.func.functional_call` at ``params`` (default: the model's own)
    and ``create_graph=True``, so the distance can be differentiated with respect to ``x``.

    ``distance="cosine"`` is ``1 - cos(grad(x), target)`` over all named parameters as one
    vector (Geiping et al. 2020), blind to the gradient's scale (use it on updates, clipped or
    multi-step ones); ``"l2"`` is the squared distance of DLG (Zhu et al. 2019), which needs the
    true gradient scale (see :func:`update_to_gradient`). ``label`` defaults to
    :func:`infer_label` (iDLG). ``bounds`` clamps the input after every step (e.g. pixel range).
    The model is left unchanged; the best input seen (lowest objective) is returned.

    Returns:
        The reconstruction, shape ``(1, *input_shape)``, detached.
    """
    if distance not in ("cosine", "l2"):
        raise ValueError(f"invert_gradients: distance must be 'cosine' or 'l2' (got {distance!r}).")
    if steps < 1:
        raise ValueError(f"invert_gradients: steps must be >= 1 (got {steps}).")
    base = dict(params) if params is not None else dict(model.named_parameters())
    names = [k for k in target_grads if k in base]
    unknown = [k for k in target_grads if k not in base]
    if unknown:
        raise KeyError(f"invert_gradients: {unknown[:4]} are not parameters of the model.")
    # The params the gradient is taken at: leaves that require grad, detached from the model.
    at = {k: v.detach().clone().requires_grad_(k in names) for k, v in base.items()}
    device = next(iter(at.values())).device
    target = [target_grads[k].detach().to(device) for k in names]
    target_flat = torch.cat([t.reshape(-1) for t in target])
    if label is None:
        label = infer_label({k: target_grads[k] for k in names})
    y = torch.as_tensor(label, device=device).reshape(1).long()

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((1, *input_shape), generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(steps * f) for f in (0.5, 0.75, 0.9)], gamma=0.3)
    was_training = model.training
    model.eval()
    best, best_x = math.inf, x.detach().clone()
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            out = functional_call(model, at, (x,))
            loss = loss_fn(out, y)
            grads = torch.autograd.grad(loss, [at[k] for k in names], create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            if distance == "cosine":
                obj = 1 - torch.nn.functional.cosine_similarity(flat, target_flat, dim=0, eps=1e-12)
            else:
                obj = (flat - target_flat).pow(2).sum()
            if tv:
                obj = obj + tv * _total_variation(x)
            value = float(obj.detach())
            if value < best:
                best, best_x = value, x.detach().clone()
            (x_grad,) = torch.autograd.grad(obj, [x])
            x.grad = x_grad
            opt.step()
            sched.step()
            if bounds is not None:
                with torch.no_grad():
                    x.clamp_(*bounds)
    finally:
        model.train(was_training)
    return best_x


def reconstruction_error(x_hat: Tensor, x: Tensor) -> float:
    """The mean squared error between a reconstruction and the true input (same numel)."""
    a = x_hat.detach().double().reshape(-1)
    b = x.detach().double().reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"reconstruction_error: {a.numel()} values against {b.numel()}.")
    return float((a - b).pow(2).mean())


def exact_recovery(x_hat: Tensor | None, x: Tensor, tol: float = 1e-4, *,
                   rescale: bool = False) -> bool:
    """Whether the reconstruction equals the input: ``max |x_hat - x| <= tol``.

    ``rescale=True`` first multiplies ``x_hat`` by the least-squares scale
    ``<x_hat, x> / <x_hat, x_hat>``: for attacks that can only recover the input up to a factor
    (matching by cosine distance a model that is positively homogeneous in its input, e.g. ReLU
    layers without biases, or any reconstruction from a gradient of unknown scale through such a
    model). :func:`analytic_recovery` is not scale-ambiguous: compare it without rescaling.
    ``None`` (no reconstruction) is never a recovery.
    """
    if x_hat is None:
        return False
    a = x_hat.detach().double().reshape(-1)
    b = x.detach().double().reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"exact_recovery: {a.numel()} values against {b.numel()}.")
    if rescale:
        denom = float(a @ a)
        if denom > 0:
            a = a * (float(a @ b) / denom)
    return bool((a - b).abs().max() <= tol)
