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
from .backdoor import Trigger, backdoor, poison
from .clients import Attack, Malicious, choose_attackers
from .poisoning import (
    alie,
    flip_labels,
    free_rider,
    gaussian,
    ipm,
    label_flip,
    scaled,
    sign_flip,
)

__all__ = ["DATA_POISONING", "attack_of", "attacked_update", "poisoned_data", "trigger_of"]

DATA_POISONING = ("label_flip", "backdoor")
"""Attacks that act through the attacker's data alone (what a split-learning client can do:
it sends activations, not updates)."""

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


def poisoned_data(config: Config, task: Task, data_fn: Callable[[str], Any],
                  client_ids: Sequence[str]) -> Callable[[str], Any]:
    """``data_fn`` for a run without ``[attack]``; else one that gives the attackers (drawn as
    :func:`attacked_update` draws them) poisoned training data — labels flipped, or triggered
    copies relabelled to the target (no boost: there is no update to scale). For paradigms
    whose clients send no model update (split learning)."""
    a = config.attack
    if a.kind == "none":
        return data_fn
    ids = list(client_ids)
    attackers = set(choose_attackers(ids, a.fraction, config.seed))
    log.info("attack: %d of %d clients poison their data (%s): %s", len(attackers), len(ids),
             a.kind, ", ".join(sorted(attackers)))
    trigger = trigger_of(config, task) if a.kind == "backdoor" else None

    def data(client: str) -> Any:
        d = data_fn(client)
        if client not in attackers:
            return d
        train = (flip_labels(d.train, task.num_classes) if trigger is None
                 else poison(d.train, trigger, a.target))
        return type(d)(train, d.eval)
    return data
