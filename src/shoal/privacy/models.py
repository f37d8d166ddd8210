"""Models and DP-SGD: which layers break per-sample clipping, and a CNN built for DP.

``check_dp_model`` asks Opacus' ``ModuleValidator`` whether a model can be trained with
per-sample gradients; BatchNorm is refused with the reason and the fix (GroupNorm).
``tramer_boneh_cnn`` is the end-to-end CNN that Tramèr & Boneh (2021) train with DP-SGD on
(Fashion-)MNIST (after Papernot et al. 2020: tanh activations, 26,010 parameters).
"""

from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ModelError

__all__ = ["check_dp_model", "tramer_boneh_cnn"]


def check_dp_model(model: nn.Module, who: str = "dp_sgd") -> None:
    """Raise :class:`ModelError` unless Opacus can compute ``model``'s per-sample gradients.

    BatchNorm mixes the examples of a batch (it normalises each one with the batch's mean and
    variance), so one example's gradient depends on all the others and clipping it no longer
    bounds that example's influence; the error says so and names GroupNorm as the fix.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return
    batchnorms = [f"'{name}' ({type(m).__name__})" for name, m in model.named_modules()
                  if isinstance(m, _BatchNorm)]
    if batchnorms:
        raise ModelError(
            f"{who}: the model has BatchNorm layers ({', '.join(batchnorms)}), which DP-SGD "
            "cannot train: BatchNorm normalises each example with statistics of the whole "
            "batch, so one example's gradient depends on the others and per-sample clipping "
            "no longer bounds its influence. Replace each BatchNorm with GroupNorm (e.g. "
            "nn.GroupNorm(min(32, C), C) for C channels; opacus.validators.ModuleValidator.fix"
            "(model) does it for you)."
        )
    raise ModelError(
        f"{who}: Opacus cannot compute per-sample gradients of this model: "
        f"{'; '.join(str(e) for e in errors)}. Replace those layers (see "
        "opacus.validators.ModuleValidator.fix)."
    )


def tramer_boneh_cnn(num_classes: int = 10) -> nn.Module:
    """Tramèr & Boneh's (2021) end-to-end CNN for 28x28 grey images, 26,010 parameters.

    Shapes: (B, 1, 28, 28) -> conv8x8/2 16, tanh -> (B, 16, 14, 14) -> maxpool2/1 ->
    (B, 16, 13, 13) -> conv4x4/2 32, tanh -> (B, 32, 5, 5) -> maxpool2/1 -> (B, 32, 4, 4) ->
    flatten 512 -> 32, tanh -> ``num_classes`` logits.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, num_classes),
    )
