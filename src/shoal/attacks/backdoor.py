"""Backdoor (targeted) poisoning by model replacement (Bagdasaryan et al. 2020): a
:class:`Trigger`, the :class:`Backdoor` attack and :func:`backdoor_success` to measure it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import tree
from ..client import ClientUpdate
from ..data.arrays import ArrayData
from ..errors import ConfigError, DataError
from ..tree import Params
from ..types import ClientInfo, ClientResult
from .clients import Attack, Colluders

__all__ = ["Backdoor", "Trigger", "backdoor", "backdoor_success", "poison"]

Predict = Callable[[Params, Tensor], Tensor]
"""``predict(params, x) -> logits``."""


@dataclass(frozen=True)
class Trigger:
    """A trigger pattern stamped on inputs.

    ``features``: indices of a flat feature vector (the last dimension) set to ``value``;
    ``square``: the side of a square in the bottom-right corner of the last two dimensions
    (image-like inputs ``(..., H, W)``) set to ``value``. Build one with :meth:`pixels` or
    :meth:`at_features`.
    """

    features: tuple[int, ...] = ()
    square: int = 0
    value: float = 1.0

    def __post_init__(self) -> None:
        if not self.features and self.square <= 0:
            raise ConfigError("Trigger: give feature indices or a square side > 0.")
        if self.square < 0:
            raise ConfigError(f"Trigger: square must be >= 0 (got {self.square}).")

    @classmethod
    def pixels(cls, size: int = 3, value: float = 1.0) -> Trigger:
        """A bright ``size x size`` square in the bottom-right corner of image-like inputs."""
        return cls(square=int(size), value=float(value))

    @classmethod
    def at_features(cls, indices: tuple[int, ...] | list[int], value: float = 1.0) -> Trigger:
        """Flat feature vectors with ``indices`` set to ``value``."""
        return cls(features=tuple(int(i) for i in indices), value=float(value))

    def apply(self, x: Tensor) -> Tensor:
        """A triggered copy of the batch ``x`` (``x`` is not modified)."""
        out = x.clone()
        if self.features:
            if max(self.features) >= x.shape[-1] or min(self.features) < -x.shape[-1]:
                raise DataError(f"Trigger: feature indices {self.features} do not fit inputs "
                                f"with {x.shape[-1]} features.")
            out[..., list(self.features)] = self.value
        if self.square:
            if x.dim() < 3:
                raise DataError(f"Trigger: a pixel square needs image-like inputs "
                                f"(batch, ..., H, W); got shape {tuple(x.shape)}.")
            out[..., -self.square:, -self.square:] = self.value
        return out


def poison(data: ArrayData, trigger: Trigger, target: int) -> ArrayData:
    """A new :class:`ArrayData`: ``data``'s examples followed by their triggered copies labelled
    ``target`` (``data`` and its pool are not modified)."""
    x, y = data.tensors()
    xs = torch.cat([x, trigger.apply(x)])
    ys = torch.cat([y, torch.full_like(y, target)])
    return ArrayData(xs, ys, torch.arange(xs.shape[0], dtype=torch.int64))


class Backdoor(Attack):
    """A backdoor by model replacement (Bagdasaryan et al. 2020, "How to backdoor federated
    learning"): the attacker trains honestly on its data mixed with triggered copies
    relabelled ``target`` (:func:`poison`) and sends its update times ``boost`` (about the
    number of clients per round over the server learning rate, so that the average is
    replaced by the backdoored model). Claims the weight of its clean data. Needs integer class
    labels and inputs the trigger fits."""

    def __init__(self, trigger: Trigger, target: int, boost: float = 1.0):
        if not boost > 0:
            raise ConfigError(f"backdoor: boost must be > 0 (got {boost}).")
        self.trigger = trigger
        self.target = int(target)
        self.boost = float(boost)

    def __repr__(self) -> str:
        return f"backdoor({self.trigger!r}, target={self.target}, boost={self.boost:g})"

    def attack(self, honest: ClientUpdate, params: Params, data: ArrayData, info: ClientInfo,
               colluders: Colluders | None) -> ClientResult:
        """Train on the poisoned data, boost the update."""
        r = honest(params, poison(data, self.trigger, self.target), info)
        return ClientResult({k: torch.mul(v, self.boost) for k, v in r.update.items()},
                            float(len(data)), r.metrics)


def backdoor(trigger: Trigger, target: int, boost: float = 1.0) -> Backdoor:
    """Train on triggered copies labelled ``target`` and boost the update; see
    :class:`Backdoor`."""
    return Backdoor(trigger, target, boost)


class _Loaded:
    def __init__(self, net: nn.Module):
        self.net = net

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


@torch.no_grad()
def backdoor_success(model: nn.Module | Predict, params: Params, data: ArrayData,
                     trigger: Trigger, target: int, batch_size: int = 1024) -> float:
    """The fraction of ``data``'s examples whose label is not ``target`` that, triggered, the
    model with ``params`` classifies as ``target`` (argmax of its outputs).

    ``model`` is an ``nn.Module`` (a copy is loaded with ``params``; the module is not changed)
    or ``predict(params, x) -> logits``. ``nan`` when every example is labelled ``target``.
    """
    predict: Predict
    if isinstance(model, nn.Module):
        net = copy.deepcopy(model)
        tree.load_params_(net, params)
        net.eval()
        predict = _Loaded(net)
    else:
        predict = model
    hits = total = 0
    for xb, yb in data.batches(batch_size):
        keep = yb != target
        if not bool(keep.any()):
            continue
        out = predict(params, trigger.apply(xb[keep]))
        hits += int((out.argmax(dim=-1) == target).sum())
        total += int(keep.sum())
    return hits / total if total else float("nan")
