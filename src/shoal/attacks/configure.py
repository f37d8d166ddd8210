"""The ``[attack]`` config section, applied: which clients (or peers) attack, and how.

:func:`attacked_update` wraps a run's client update in :class:`~shoal.attacks.Malicious` as the
config says; the federated and swarm builders call it, so every executor, secure aggregation
(where the coordinator sees only the sum) and the swarm's peers run the same attackers. Which
clients attack is drawn from the run's seed and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..client import ClientUpdate
from ..config import Config
from ..data.tasks import Task
from .backdoor import Trigger, backdoor
from .clients import Attack, Malicious, choose_attackers
from .poisoning import alie, free_rider, gaussian, ipm, label_flip, scaled, sign_flip

__all__ = ["attack_of", "attacked_update", "trigger_of"]

log = logging.getLogger(__name__)


def trigger_of(config: Config, task: Task) -> Trigger:
    """The backdoor's trigger for ``task``'s inputs: a square of pixels for images (inputs with
    at least 2 dimensions per example), else the first ``trigger_size`` features."""
    a = config.attack
    x = task.test.x if task.test is not None else None
    if x is not None and x.dim() >= 3:
        return Trigger.pixels(a.trigger_size, a.trigger_value)
    return Trigger.at_features(list(range(a.trigger_size)), a.trigger_value)


def attack_of(config: Config, task: Task, population: int) -> Attack:
    """The attack ``[attack]`` describes, for a federation of ``population`` clients."""
    a = config.attack
    make: dict[str, Callable[[], Attack]] = {
        "label_flip": lambda: label_flip(task.num_classes),
        "sign_flip": lambda: sign_flip(a.scale),
        "scaled": lambda: scaled(a.scale),
        "gaussian": lambda: gaussian(a.sigma),
        "free_rider": free_rider,
        "alie": lambda: alie(a.z or None, population),
        "ipm": lambda: ipm(a.epsilon),
        "backdoor": lambda: backdoor(trigger_of(config, task), a.target, a.boost),
    }
    return make[a.kind]()


def attacked_update(config: Config, task: Task, update: ClientUpdate, client_ids: Sequence[str],
                    data_fn: Callable[[str], Any]) -> ClientUpdate:
    """``update`` for a run without ``[attack]``; else wrapped so that ``attack.fraction`` of
    ``client_ids`` (drawn from the seed) run the attack."""
    a = config.attack
    if a.kind == "none":
        return update
    ids = list(client_ids)
    attackers = choose_attackers(ids, a.fraction, config.seed)
    attack = attack_of(config, task, len(ids))
    log.info("attack: %d of %d participants run %r: %s", len(attackers), len(ids), attack,
             ", ".join(attackers))
    return Malicious(update, attack, attackers, data_fn=data_fn, seed=config.seed)
