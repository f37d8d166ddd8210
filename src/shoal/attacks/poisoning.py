"""Data and model poisoning attacks: label flipping, sign flipping, scaling, Gaussian noise,
free riding, and the collusive ALIE and IPM attacks. Use them with
:class:`~shoal.attacks.clients.Malicious`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

from ..client import ClientUpdate
from ..data.arrays import ArrayData
from ..errors import ConfigError
from ..seeding import torch_generator
from ..tree import Params
from ..types import ClientInfo, ClientResult
from .clients import Attack, Colluders

__all__ = [
    "ALIE",
    "IPM",
    "FreeRider",
    "Gaussian",
    "LabelFlip",
    "Scaled",
    "alie",
    "alie_z",
    "flip_labels",
    "free_rider",
    "gaussian",
    "ipm",
    "label_flip",
    "scaled",
    "sign_flip",
]


def flip_labels(data: ArrayData, num_classes: int) -> ArrayData:
    """A new :class:`ArrayData` of ``data``'s examples (copied, in its order) with labels
    ``num_classes - 1 - y``; ``data`` and its pool are not modified."""
    x, y = data.tensors()
    return ArrayData(x, num_classes - 1 - y, torch.arange(len(data), dtype=torch.int64))


class LabelFlip(Attack):
    """Label flipping (data poisoning; e.g. Tolpegin et al. 2020, "Data poisoning attacks
    against federated learning systems"): the attacker trains honestly on its examples
    relabelled ``y -> num_classes - 1 - y``. Needs integer class labels."""

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ConfigError(f"label_flip: num_classes must be >= 2 (got {num_classes}).")
        self.num_classes = int(num_classes)

    def __repr__(self) -> str:
        return f"label_flip({self.num_classes})"

    def attack(self, honest: ClientUpdate, params: Params, data: ArrayData, info: ClientInfo,
               colluders: Colluders | None) -> ClientResult:
        """Train honestly on the flipped labels."""
        return honest(params, flip_labels(data, self.num_classes), info)


def label_flip(num_classes: int) -> LabelFlip:
    """Train on labels ``num_classes - 1 - y``; see :class:`LabelFlip`."""
    return LabelFlip(num_classes)


class Scaled(Attack):
    """The honest update times ``factor``: ``-scale`` is sign flipping (a classic Byzantine
    failure, e.g. Damaskinos et al. 2018 / Li et al. 2019 "RSA"), a large positive factor is a
    boosting attack. Claims the honest weight."""

    def __init__(self, factor: float, name: str = "scaled"):
        if not math.isfinite(factor):
            raise ConfigError(f"{name}: the factor must be finite (got {factor}).")
        self.factor = float(factor)
        self.name = name

    def __repr__(self) -> str:
        if self.name == "sign_flip":
            return f"sign_flip({-self.factor:g})"
        return f"scaled({self.factor:g})"

    def attack(self, honest: ClientUpdate, params: Params, data: ArrayData, info: ClientInfo,
               colluders: Colluders | None) -> ClientResult:
        """The honest result with its update times ``factor``."""
        r = honest(params, data, info)
        return ClientResult({k: torch.mul(v, self.factor) for k, v in r.update.items()},
                            r.weight, r.metrics)


def sign_flip(scale: float = 1.0) -> Scaled:
    """Send ``-scale`` times the honest update; see :class:`Scaled`."""
    if not scale > 0:
        raise ConfigError(f"sign_flip: scale must be > 0 (got {scale}).")
    return Scaled(-float(scale), "sign_flip")


def scaled(factor: float) -> Scaled:
    """Send ``factor`` times the honest update; see :class:`Scaled`."""
    return Scaled(factor)


class Gaussian(Attack):
    """A random update: each coordinate drawn from ``N(0, sigma^2)`` (the Gaussian Byzantine
    attack of e.g. Blanchard et al. 2017, "Krum"), of the params' shapes and dtypes, from
    ``info.seed``; no training. Claims the honest weight (the number of examples)."""

    def __init__(self, sigma: float):
        if not sigma > 0:
            raise ConfigError(f"gaussian: sigma must be > 0 (got {sigma}).")
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return f"gaussian({self.sigma:g})"

    def attack(self, honest: ClientUpdate, params: Params, data: ArrayData, info: ClientInfo,
               colluders: Colluders | None) -> ClientResult:
        """Noise of the params' shapes."""
        g = torch_generator(info.seed, "attack", "gaussian")
        update = {k: (torch.randn(v.shape, generator=g, dtype=torch.float64) * self.sigma)
                  .to(device=v.device, dtype=v.dtype) for k, v in params.items()}
        return ClientResult(update, float(len(data)), {})


def gaussian(sigma: float) -> Gaussian:
    """Send ``N(0, sigma^2)`` noise; see :class:`Gaussian`."""
    return Gaussian(sigma)


class FreeRider(Attack):
    """A free rider (Lin et al. 2019, "Free-riders in federated learning"): sends a zero update
    without training, claiming the honest weight (its number of examples). With
    ``mimic=True`` it sends instead the last change of the global params it saw (``params``
    minus the params of its previous call; zeros on its first) — state kept in the attack
    object, so in-process executors only."""

    def __init__(self, mimic: bool = False):
        self.mimic = bool(mimic)
        self._last: Params | None = None

    def __repr__(self) -> str:
        return "free_rider(mimic=True)" if self.mimic else "free_rider()"

    def attack(self, honest: ClientUpdate, params: Params, data: ArrayData, info: ClientInfo,
               colluders: Colluders | None) -> ClientResult:
        """Zeros (or the last global change)."""
        last = self._last
        if self.mimic:
            self._last = {k: v.detach().clone() for k, v in params.items()}
        if self.mimic and last is not None and last.keys() == params.keys():
            update = {k: params[k] - last[k] for k in params}
        else:
            update = {k: torch.zeros_like(v) for k, v in params.items()}
        return ClientResult(update, float(len(data)), {})


def free_rider(mimic: bool = False) -> FreeRider:
    """Send a zero update (or the last global change); see :class:`FreeRider`."""
    return FreeRider(mimic)


def _stack(updates: Sequence[Params], name: str) -> torch.Tensor:
    return torch.stack([u[name] for u in updates])


def _own(colluders: Colluders | None, params: Params, info: ClientInfo,
         what: str) -> tuple[list[Params], ClientResult]:
    if colluders is None:
        raise ConfigError(f"{what} is collusive: run it through Malicious(..., data_fn=...).")
    results = colluders.results(params, info)
    return [r.update for r in results.values()], results[info.client_id]


def alie_z(num_clients: int, num_attackers: int) -> float:
    """ALIE's ``z_max`` (Baruch et al. 2019, §3): with ``s = floor(n/2 + 1) - m`` the number of
    benign clients the attackers need on their side, ``z = Phi^-1((n - s) / n)``."""
    n, m = int(num_clients), int(num_attackers)
    if not 0 < m < n:
        raise ConfigError(f"alie: need 0 < attackers < clients (got {m} of {n}).")
    s = math.floor(n / 2 + 1) - m
    p = (n - s) / n
    if not 0 < p < 1:
        raise ConfigError(f"alie: with {m} attackers of {n} clients the attackers are a "
                          "majority; z is unbounded. Pass z explicitly.")
    return NormalDist().inv_cdf(p)


class ALIE(Attack):
    """"A little is enough" (Baruch et al. 2019): the colluders estimate the per-coordinate mean
    ``mu`` and standard deviation ``sigma`` (population, ``correction=0``) of benign updates
    from their own honest updates, and every one of them sends ``mu - z * sigma`` — a shift
    small enough to pass median- and distance-based defences. ``z=None`` takes the paper's
    ``z_max`` (:func:`alie_z`) from ``num_clients`` (clients per round) and the number of
    attackers.

    Needs the colluders' honest updates: :class:`~shoal.attacks.clients.Malicious` with
    ``data_fn``, run by the sequential executor (in-process; see :class:`Colluders`). Claims
    the attacker's honest weight."""

    collusive = True

    def __init__(self, z: float | None = None, num_clients: int | None = None):
        if z is None and num_clients is None:
            raise ConfigError("alie: pass z, or num_clients (clients per round) to compute the "
                              "paper's z_max.")
        if z is not None and not math.isfinite(z):
            raise ConfigError(f"alie: z must be finite (got {z}).")
        self.z = None if z is None else float(z)
        self.num_clients = num_clients
        self.z_used: float | None = self.z
        """The ``z`` the attack sends with (set by :meth:`check` when ``z`` is ``None``)."""

    def __repr__(self) -> str:
        return f"alie(z={self.z:g})" if self.z is not None else \
            f"alie(num_clients={self.num_clients})"

    def check(self, attackers: Sequence[str]) -> None:
        """Compute ``z`` from the number of attackers when it was not given."""
        if self.z is None:
            assert self.num_clients is not None
            self.z_used = alie_z(self.num_clients, len(attackers))

    def attack(self, honest: ClientUpdate, params: Params, data: ArrayData, info: ClientInfo,
               colluders: Colluders | None) -> ClientResult:
        """``mean - z * std`` of the colluders' honest updates."""
        z = self.z_used
        if z is None:
            raise ConfigError("alie: z is unknown; run the attack through Malicious.")
        updates, own = _own(colluders, params, info, repr(self))
        out = {}
        for k in updates[0]:
            s = _stack(updates, k)
            out[k] = s.mean(dim=0) - z * s.std(dim=0, correction=0)
        return ClientResult(out, own.weight, own.metrics)


def alie(z: float | None = None, num_clients: int | None = None) -> ALIE:
    """"A little is enough": send ``mean - z * std`` of the colluders' honest updates; see
    :class:`ALIE`."""
    return ALIE(z, num_clients)


class IPM(Attack):
    """Inner-product manipulation (Xie et al. 2020, "Fall of empires"): every colluder sends
    ``-epsilon`` times the mean of the colluders' honest updates, so that the aggregate's inner
    product with the true gradient turns negative (small ``epsilon`` passes median/Krum; large
    ``epsilon`` overwhelms a mean). Collusive: needs the sequential executor and
    :class:`~shoal.attacks.clients.Malicious` with ``data_fn``. Claims the honest weight."""

    collusive = True

    def __init__(self, epsilon: float):
        if not epsilon > 0:
            raise ConfigError(f"ipm: epsilon must be > 0 (got {epsilon}).")
        self.epsilon = float(epsilon)

    def __repr__(self) -> str:
        return f"ipm({self.epsilon:g})"

    def attack(self, honest: ClientUpdate, params: Params, data: ArrayData, info: ClientInfo,
               colluders: Colluders | None) -> ClientResult:
        """``-epsilon * mean`` of the colluders' honest updates."""
        updates, own = _own(colluders, params, info, repr(self))
        out = {k: -self.epsilon * _stack(updates, k).mean(dim=0) for k in updates[0]}
        return ClientResult(out, own.weight, own.metrics)


def ipm(epsilon: float) -> IPM:
    """Inner-product manipulation: send ``-epsilon * mean`` of the colluders' honest updates;
    see :class:`IPM`."""
    return IPM(epsilon)
