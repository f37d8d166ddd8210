"""Malicious participants for simulations: attacks as client-update wrappers.

:class:`Malicious` runs the honest client update for benign clients and an attack for the
clients :func:`choose_attackers` picks; no algorithm changes. The attacks:

- :func:`label_flip` — train on labels ``C - 1 - y`` (data poisoning; Tolpegin et al. 2020).
- :func:`sign_flip`, :func:`scaled` — the honest update times ``-scale`` / ``factor``
  (Byzantine sign flipping; boosting).
- :func:`gaussian` — ``N(0, sigma^2)`` noise of the update's shapes (Blanchard et al. 2017).
- :func:`free_rider` — a zero update with the honest weight (Lin et al. 2019).
- :func:`alie` — "A little is enough": ``mean - z * std`` of the colluders' honest updates
  (Baruch et al. 2019); collusive.
- :func:`ipm` — inner-product manipulation: ``-epsilon * mean`` of the colluders' honest
  updates (Xie et al. 2020); collusive.
- :func:`backdoor` — a :class:`Trigger` backdoor by model replacement (Bagdasaryan et al.
  2020), measured by :func:`backdoor_success`.

From a config, ``[attack]`` (:mod:`shoal.attacks.configure`) puts them in federated runs (also
under secure aggregation) and swarm runs.

Attacks draw their randomness from the run's seeds: they model an adversary, reproducibly.
Collusive attacks share state in-process: use the sequential executor.
"""

from .backdoor import Backdoor, Trigger, backdoor, backdoor_success, poison
from .clients import Attack, Colluders, Malicious, choose_attackers, honest_data
from .poisoning import (
    ALIE,
    IPM,
    FreeRider,
    Gaussian,
    LabelFlip,
    Scaled,
    alie,
    alie_z,
    flip_labels,
    free_rider,
    gaussian,
    ipm,
    label_flip,
    scaled,
    sign_flip,
)

__all__ = [
    "ALIE",
    "IPM",
    "Attack",
    "Backdoor",
    "Colluders",
    "FreeRider",
    "Gaussian",
    "LabelFlip",
    "Malicious",
    "Scaled",
    "Trigger",
    "alie",
    "alie_z",
    "backdoor",
    "backdoor_success",
    "choose_attackers",
    "flip_labels",
    "free_rider",
    "gaussian",
    "honest_data",
    "ipm",
    "label_flip",
    "poison",
    "scaled",
    "sign_flip",
]
