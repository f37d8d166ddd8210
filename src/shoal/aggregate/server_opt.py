"""Server optimizers: how the coordinator applies the aggregated update (FedOpt family).

Reddi et al. 2021, "Adaptive Federated Optimization", treat the averaged client update
``delta`` as a pseudo-gradient (``-delta``) and apply a server optimizer to it:

* ``sgd(lr)`` — ``x += lr * delta``; ``sgd(1.0)`` is plain FedAvg.
* ``momentum(lr, beta)`` — FedAvgM (Hsu et al. 2019): ``v = beta * v + delta; x += lr * v``
  (the same as ``torch.optim.SGD(momentum=beta)`` fed ``grad = -delta``).
* ``adagrad``, ``adam``, ``yogi`` — Algorithm 2 of Reddi et al.:
  ``m = b1 * m + (1 - b1) * delta``;
  ``v = v + delta²`` (Adagrad), ``v = b2 * v + (1 - b2) * delta²`` (Adam),
  ``v = v - (1 - b2) * delta² * sign(v - delta²)`` (Yogi);
  ``x += lr * m / (sqrt(v) + tau)``, with ``v`` starting at ``tau²`` and no bias correction.

Each optimizer is pure: ``apply(params, update, state) -> (params, state)`` with the state an
explicit dict of tensors (saved in checkpoints).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..tree import Params

__all__ = ["Adaptive", "Momentum", "SGD", "ServerOpt", "ServerOptState", "adagrad", "adam",
           "momentum", "sgd", "yogi"]

ServerOptState = dict[str, Any]


class ServerOpt:
    """Base class: ``init(params) -> state`` and ``apply(params, update, state)``."""

    def init(self, params: Params) -> ServerOptState:
        """The optimizer state before the first round."""
        return {}

    def apply(self, params: Params, update: Params,
              state: ServerOptState) -> tuple[Params, ServerOptState]:
        """New params and state after applying the aggregated ``update``."""
        raise NotImplementedError


def _positive(name: str, field: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"{name}: {field} must be > 0 (got {value}).")
    return float(value)


def _fraction(name: str, field: str, value: float) -> float:
    if not 0 <= value < 1:
        raise ConfigError(f"{name}: {field} must be in [0, 1) (got {value}).")
    return float(value)


class SGD(ServerOpt):
    """``x += lr * delta``; ``lr = 1`` is plain federated averaging."""

    def __init__(self, lr: float = 1.0):
        self.lr = _positive("sgd", "lr", lr)

    def __repr__(self) -> str:
        return f"sgd({self.lr:g})"

    def apply(self, params: Params, update: Params,
              state: ServerOptState) -> tuple[Params, ServerOptState]:
        return {k: p + self.lr * update[k] for k, p in params.items()}, state


class Momentum(ServerOpt):
    """FedAvgM: ``v = beta * v + delta; x += lr * v``."""

    def __init__(self, lr: float = 1.0, beta: float = 0.9):
        self.lr = _positive("momentum", "lr", lr)
        self.beta = _fraction("momentum", "beta", beta)

    def __repr__(self) -> str:
        return f"momentum({self.lr:g}, beta={self.beta:g})"

    def init(self, params: Params) -> ServerOptState:
        return {"velocity": {k: torch.zeros_like(p) for k, p in params.items()}}

    def apply(self, params: Params, update: Params,
              state: ServerOptState) -> tuple[Params, ServerOptState]:
        v = {k: self.beta * state["velocity"][k] + update[k] for k in params}
        return {k: p + self.lr * v[k] for k, p in params.items()}, {"velocity": v}


class Adaptive(ServerOpt):
    """FedAdagrad, FedAdam and FedYogi (Reddi et al. 2021, Algorithm 2)."""

    def __init__(self, rule: str, lr: float, beta1: float, beta2: float, tau: float):
        if rule not in ("adagrad", "adam", "yogi"):
            raise ConfigError(f"adaptive server optimizer: unknown rule {rule!r}.")
        self.rule = rule
        self.lr = _positive(rule, "lr", lr)
        self.beta1 = _fraction(rule, "beta1", beta1)
        self.beta2 = _fraction(rule, "beta2", beta2)
        self.tau = _positive(rule, "tau", tau)

    def __repr__(self) -> str:
        b2 = "" if self.rule == "adagrad" else f", beta2={self.beta2:g}"
        return f"{self.rule}({self.lr:g}, beta1={self.beta1:g}{b2}, tau={self.tau:g})"

    def init(self, params: Params) -> ServerOptState:
        return {
            "m": {k: torch.zeros_like(p) for k, p in params.items()},
            "v": {k: torch.full_like(p, self.tau ** 2) for k, p in params.items()},
        }

    def apply(self, params: Params, update: Params,
              state: ServerOptState) -> tuple[Params, ServerOptState]:
        b1, b2 = self.beta1, self.beta2
        m_new, v_new, out = {}, {}, {}
        for k, p in params.items():
            d = update[k]
            d2 = d * d
            m = b1 * state["m"][k] + (1 - b1) * d
            v = state["v"][k]
            if self.rule == "adagrad":
                v = v + d2
            elif self.rule == "adam":
                v = b2 * v + (1 - b2) * d2
            else:
                v = v - (1 - b2) * d2 * torch.sign(v - d2)
            m_new[k], v_new[k] = m, v
            out[k] = p + self.lr * m / (v.sqrt() + self.tau)
        return out, {"m": m_new, "v": v_new}


def sgd(lr: float = 1.0) -> SGD:
    """Plain server step ``x += lr * delta`` (FedAvg when ``lr = 1``)."""
    return SGD(lr)


def momentum(lr: float = 1.0, beta: float = 0.9) -> Momentum:
    """FedAvgM's server momentum."""
    return Momentum(lr, beta)


def adagrad(lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3) -> Adaptive:
    """FedAdagrad (Reddi et al. 2021)."""
    return Adaptive("adagrad", lr, beta1, 0.0, tau)


def adam(lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> Adaptive:
    """FedAdam (Reddi et al. 2021)."""
    return Adaptive("adam", lr, beta1, beta2, tau)


def yogi(lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> Adaptive:
    """FedYogi (Reddi et al. 2021)."""
    return Adaptive("yogi", lr, beta1, beta2, tau)
