"""Protections: stages on the tensors that cross the cut.

A :class:`CutStage` may change the activations a client sends (``activations``, run on the
client before sending), the gradient the server returns (``gradient``, run on the server before
sending), and may add a term to the client's loss (``client_loss``). Only what crosses the cut,
and the client's own objective, change; the server always trains on what it received and
the client always back-propagates the gradient it received.

Built in: :class:`ActivationNoise` (Gaussian noise on the activations), :class:`GradientNoise`
(isotropic Gaussian noise on the returned gradients, scaled by the batch's largest per-example
gradient norm: the "iso" label protection Li et al. 2021 compare with) and :class:`NoPeek`
(``alpha`` times the distance correlation of inputs and activations added to the client's loss,
Vepakomma et al. 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..seeding import torch_generator
from .leakage import distance_correlation

__all__ = ["ActivationNoise", "CutContext", "CutStage", "GradientNoise", "NoPeek"]


@dataclass(frozen=True)
class CutContext:
    """Where a tensor crosses: the client, round and step, and the client's seed for the
    round (protections draw their noise from it)."""

    client: str
    round: int
    step: int
    seed: int

    def generator(self, purpose: str) -> torch.Generator:
        """A generator for ``purpose`` at this client, round and step."""
        return torch_generator(self.seed, purpose, self.step)


class CutStage:
    """A protection on the tensors crossing the cut; every hook is the identity by default."""

    def activations(self, activations: Tensor, ctx: CutContext) -> Tensor:
        """What the client sends instead of ``activations`` (on the client)."""
        return activations

    def gradient(self, gradient: Tensor, ctx: CutContext) -> Tensor:
        """What the server returns instead of ``gradient`` (on the server)."""
        return gradient

    def client_loss(self, inputs: Tensor, activations: Tensor) -> Tensor | None:
        """A term added to the client's loss, or ``None``."""
        return None


def _nonnegative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}: expected a finite number >= 0, got {value!r}.")
    return float(value)


class ActivationNoise(CutStage):
    """Adds Gaussian noise of standard deviation ``std`` to the activations sent."""

    def __init__(self, std: float):
        self.std = _nonnegative("ActivationNoise.std", std)

    def __repr__(self) -> str:
        return f"ActivationNoise(std={self.std})"

    def activations(self, activations: Tensor, ctx: CutContext) -> Tensor:
        """``activations + N(0, std^2)``."""
        noise = torch.randn(activations.shape, generator=ctx.generator("split.activation_noise"),
                            dtype=activations.dtype)
        return activations + self.std * noise


class GradientNoise(CutStage):
    """Adds isotropic Gaussian noise to the returned gradients, of standard deviation
    ``scale * max_i ||g_i|| / sqrt(d)`` (the batch's largest per-example gradient norm over the
    square root of the per-example dimension): ``scale = 1`` gives noise as large as the largest
    gradient."""

    def __init__(self, scale: float):
        self.scale = _nonnegative("GradientNoise.scale", scale)

    def __repr__(self) -> str:
        return f"GradientNoise(scale={self.scale})"

    def gradient(self, gradient: Tensor, ctx: CutContext) -> Tensor:
        """``gradient + N(0, sigma^2)`` with sigma as in the class docstring."""
        flat = gradient.flatten(1)
        sigma = self.scale * float(flat.norm(dim=1).max()) / math.sqrt(flat.shape[1])
        noise = torch.randn(gradient.shape, generator=ctx.generator("split.gradient_noise"),
                            dtype=gradient.dtype)
        return gradient + sigma * noise


class NoPeek(CutStage):
    """NoPeek: ``alpha * DCor(inputs, activations)`` added to the client's loss."""

    def __init__(self, alpha: float):
        self.alpha = _nonnegative("NoPeek.alpha", alpha)

    def __repr__(self) -> str:
        return f"NoPeek(alpha={self.alpha})"

    def client_loss(self, inputs: Tensor, activations: Tensor) -> Tensor | None:
        """``alpha`` times the distance correlation of the batch's inputs and activations."""
        return self.alpha * distance_correlation(inputs.to(activations.dtype), activations)
