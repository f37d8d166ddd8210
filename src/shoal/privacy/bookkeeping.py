"""Book-keeping clipping (Bu et al. 2023): Opacus' ghost clipping in one backward pass.

Ghost clipping (Li et al. 2022, in Opacus) needs two backward passes: one for the per-example
gradient norms, one more for the sum of the clipped gradients. Book-keeping keeps what the first
pass already had and forms the clipped sum from it directly:

* ``nn.Linear`` on (B, in) inputs: the per-example gradient is ``g_i a_iᵀ``, its norm
  ``|g_i| |a_i|`` (Opacus' ghost norm sampler), and the clipped sum ``(c ⊙ G)ᵀ A`` — one matmul
  with the stored activations A (B, in) and output gradients G (B, out).
* ``nn.Conv2d`` (zero padding): per-example gradients from one call of the convolution's
  weight-gradient kernel, the batch read as one example with B times the groups (same
  arithmetic as Opacus' im2col + batched matmul sampler, several times faster on CPU); then
  ``Σ_i c_i ∇_i``.
* every other layer (norms, embeddings, other convolutions): Opacus' per-example gradient
  sampler, kept until the clipping factors are known, then ``Σ_i c_i ∇_i``.

The first pass asks autograd only for the gradient of the input (``autograd.grad``), so no
parameter gradient is computed and thrown away. The result equals Opacus' ghost clipping (tested
against per-example gradients from ``torch.func``).
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.utils.module_utils import trainable_parameters
from torch import Tensor, nn

__all__ = ["BookKeepingModule"]


def _conv2d_grad_sample(layer: nn.Conv2d, activations: list[Tensor],
                        backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients of a Conv2d, (B, *weight.shape) and (B, out), by one call of
    the convolution's own weight-gradient kernel: the batch of B examples is read as a single
    example with B times the groups, so group b of the "weight gradient" is example b's."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    x = activations[0].to(backprops.dtype)  # (B, C, H, W)
    n = x.shape[0]
    g = backprops  # (B, O, H', W')
    out: dict[Any, Tensor] = {}
    if layer.weight.requires_grad:
        o, c_per_group, kh, kw = layer.weight.shape
        w = torch.ops.aten.convolution_backward(
            g.reshape(1, n * o, *g.shape[2:]), x.reshape(1, -1, *x.shape[2:]),
            g.new_empty(n * o, c_per_group, kh, kw),  # read for its shape only
            None, layer.stride, layer.padding, layer.dilation, False, [0, 0],
            n * layer.groups, [False, True, False])[1]
        out[layer.weight] = w.view(n, o, c_per_group, kh, kw)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum((2, 3))
    return out


class BookKeepingModule(GradSampleModuleFastGradientClipping):
    """An Opacus ghost-clipping module that also keeps what the clipped sum needs.

    After a backward pass with hooks on, :meth:`clip_and_sum_` sets every parameter's
    ``.grad`` to the sum over the batch of its per-example gradients clipped (jointly, over all
    parameters) to ``max_grad_norm`` — what ghost clipping's second backward pass computes.
    """

    def capture_backprops_hook(self, module: nn.Module, _forward_input: Tensor,
                               forward_output: Tensor, loss_reduction: str,
                               batch_first: bool) -> None:
        """Record per-example norms (and what the clipped sum needs) for ``module``."""
        if not self.hooks_enabled:
            return
        backprops = forward_output[0].detach()
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction=loss_reduction,
            batch_first=batch_first)
        if type(module) is nn.Linear and backprops.dim() == 2:
            for param, norm in compute_linear_norm_sample(module, activations, backprops).items():
                param._norm_sample = norm
            module.__dict__["_bk"] = (activations[0].to(backprops.dtype),
                                      backprops)  # (B, in), (B, out)
        else:
            sampler: Any = (_conv2d_grad_sample if type(module) is nn.Conv2d
                       else self.GRAD_SAMPLERS.get(type(module), ft_compute_per_sample_gradient))
            for param, gs in sampler(module, activations, backprops).items():
                if param.requires_grad:
                    param.__dict__["_bk_grad_sample"] = gs  # (B, *param.shape)
                    # A reduction over the trailing dims: no copy of the per-example
                    # gradients, which flatten(1) of a non-contiguous sample would make.
                    param.__dict__["_norm_sample"] = torch.linalg.vector_norm(
                        gs, dim=tuple(range(1, gs.dim())))
        for _, p in trainable_parameters(module):
            p._forward_counter -= 1

    def capture_activations_hook(self, module: nn.Module, forward_input: list[Tensor],
                                 forward_output: Tensor) -> None:
        """Opacus' activation capture; also note the layers whose input needs no gradient."""
        super().capture_activations_hook(module, forward_input, forward_output)
        if (self.hooks_enabled and module.training and torch.is_grad_enabled()
                and not any(isinstance(t, Tensor) and t.requires_grad for t in forward_input)):
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                self.__dict__.setdefault("_entry_probes", []).append(
                    min(own, key=lambda p: p.numel()))

    def probes(self) -> list[nn.Parameter]:
        """What the backward pass asks autograd for: the smallest trainable parameter (a bias
        where there is one) of each layer the last forward pass entered from the data.

        Every other layer's input then needs a gradient, so every backward hook runs, while
        no weight gradient (which the clipped sum replaces) and no gradient of the data is
        computed."""
        found = self.__dict__.pop("_entry_probes", [])
        return found or list(self.trainable_parameters)

    def clip_and_sum_(self) -> Tensor:
        """Set each ``.grad`` to the clipped per-example sum; return the factors (B,)."""
        coef = self.get_clipping_coef()  # (B,)
        for module in self._module.modules():
            stored = module.__dict__.pop("_bk", None)
            if stored is not None:
                a, g = stored
                cg = g * coef.to(g.dtype).unsqueeze(1)  # (B, out)
                if module.weight.requires_grad:
                    module.weight.grad = cg.t() @ a  # (out, in)
                if module.bias is not None and module.bias.requires_grad:
                    module.bias.grad = cg.sum(0)
        for p in self.trainable_parameters:
            gs = p.__dict__.pop("_bk_grad_sample", None)
            if gs is not None:
                p.grad = torch.einsum("b,b...->...", coef.to(gs.dtype), gs)
        return coef
