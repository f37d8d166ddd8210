"""Malicious participants as client updates: :class:`Malicious` runs the honest update for
benign clients and an :class:`Attack` for the clients it names.

An attack models an adversary, not a secret: its randomness comes from the run's seeds
(``info.seed``, or the ``seed`` given to :class:`Malicious`), so a poisoned run is as
reproducible as a clean one. Nothing in the algorithms changes: the wrapper is the client
update. It is not :class:`~shoal.client.Batchable`, so the vectorized executor runs the cohort
one client at a time.

Collusive attacks (ALIE, IPM) pool the honest updates of every attacker through a shared
in-process object (:class:`Colluders`), which needs the in-process executors (sequential, or
vectorized, which falls back to sequential for this update); in worker processes
:class:`Malicious` raises a :class:`~shoal.errors.ConfigError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Sequence
from typing import Any

from ..client import ClientUpdate
from ..data.arrays import ArrayData
from ..errors import ConfigError
from ..seeding import derive_seed, numpy_rng
from ..tree import Params
from ..types import ClientInfo, ClientResult

__all__ = ["Attack", "Colluders", "Malicious", "choose_attackers", "honest_data"]

DataFn = Callable[[str], Any]
"""``data_fn(client_id)``: a client's data (an :class:`ArrayData`, or a ``ClientData`` whose
``train`` is used), as the transport's ``data_fn``."""


def honest_data(data: Any) -> ArrayData:
    """The training data of what a ``data_fn`` returns: ``data.train`` or ``data`` itself."""
    return getattr(data, "train", data)


class Attack:
    """Base class of an attack: what an attacker sends instead of its honest update.

    :meth:`attack` gets the ``honest`` client update (to train with, on its own or poisoned
    data), the global ``params``, the attacker's ``data`` and ``info``, and, for a
    ``collusive`` attack, the :class:`Colluders` (the honest updates of every attacker).
    """

    collusive: bool = False
    """Whether the attack needs its colluders' honest updates."""

    def attack(self, honest: ClientUpdate, params: Params, data: ArrayData, info: ClientInfo,
               colluders: Colluders | None) -> ClientResult:
        """The attacker's reply."""
        raise NotImplementedError

    def check(self, attackers: Sequence[str]) -> None:
        """Raise a :class:`~shoal.errors.ConfigError` when this attack cannot be run by
        ``attackers`` (called by :class:`Malicious` when it is built)."""


class Colluders:
    """What colluding attackers share: each attacker's honest update in the current round.

    The adversary controls every attacker, so it may train on each one's data: the first
    attacker called in a round computes the honest update of every attacker (``data_fn`` gives
    their data), each with the seed ``derive_seed(seed, "colluder", round, client_id)`` and the
    config of that first request; the others of the round reuse them. The result does not
    depend on which attacker is called first. Only the latest round is kept.
    """

    def __init__(self, attackers: Sequence[str], honest: ClientUpdate, data_fn: DataFn,
                 seed: int):
        self.ids = list(attackers)
        self.honest = honest
        self.data_fn = data_fn
        self.seed = seed
        self._key: tuple[int, int] | None = None
        self._params: Params | None = None  # kept so that id(params) is not reused meanwhile
        self._results: dict[str, ClientResult] = {}

    def __repr__(self) -> str:
        return f"Colluders({len(self.ids)} attackers, seed={self.seed})"

    def info(self, client_id: str, round: int, config: Any) -> ClientInfo:
        """The info an attacker's honest update is computed with."""
        return ClientInfo(client_id, round, derive_seed(self.seed, "colluder", round, client_id),
                          config)

    def results(self, params: Params, info: ClientInfo) -> dict[str, ClientResult]:
        """Every attacker's honest result for the round of ``info`` from ``params`` (computed
        on first use in the round)."""
        key = (info.round, id(params))
        if key != self._key:
            self._results = {
                cid: self.honest(params, honest_data(self.data_fn(cid)),
                                 self.info(cid, info.round, info.config))
                for cid in self.ids}
            self._key, self._params = key, params
        return self._results

    def updates(self, params: Params, info: ClientInfo) -> list[Params]:
        """Every attacker's honest update for the round of ``info``, in attacker order."""
        return [r.update for r in self.results(params, info).values()]


class Malicious:
    """A client update that runs ``honest`` for benign clients and ``attack`` for the clients in
    ``attackers``.

    ``data_fn`` (the transport's) and ``seed`` (the run's) are needed by collusive attacks
    only (:class:`Colluders`). Benign clients get exactly the honest update's result. Runs in
    the process it was built in only (collusion shares in-process state): a call in another
    process raises a :class:`~shoal.errors.ConfigError` naming the executor to use.
    """

    def __init__(self, honest: ClientUpdate, attack: Attack, attackers: Collection[str], *,
                 data_fn: DataFn | None = None, seed: int = 0):
        if isinstance(attackers, str):
            raise ConfigError("Malicious: attackers must be a collection of client ids, not "
                              f"one string ({attackers!r}).")
        self.honest = honest
        self.attack = attack
        self.attackers = frozenset(attackers)
        ordered = sorted(self.attackers)
        attack.check(ordered)
        self.colluders: Colluders | None = None
        if attack.collusive:
            if data_fn is None:
                raise ConfigError(
                    f"Malicious: {attack!r} is collusive: pass data_fn (the transport's) so the "
                    "colluders can compute each attacker's honest update.")
            if not ordered:
                raise ConfigError(f"Malicious: {attack!r} is collusive and needs at least one "
                                  "attacker.")
            self.colluders = Colluders(ordered, honest, data_fn, seed)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        names = sorted(self.attackers)
        shown = ", ".join(map(repr, names[:4])) + (", ..." if len(names) > 4 else "")
        return (f"malicious({self.honest!r}, {self.attack!r}, "
                f"attackers={len(names)} [{shown}])")

    def is_attacker(self, client_id: str) -> bool:
        """Whether ``client_id`` attacks."""
        return client_id in self.attackers

    def __call__(self, params: Params, data: ArrayData, info: ClientInfo) -> ClientResult:
        if info.client_id not in self.attackers:
            return self.honest(params, data, info)
        if self.colluders is not None and os.getpid() != self._pid:
            raise ConfigError(
                f"Malicious: {self.attack!r} is collusive: its attackers share honest updates "
                "in the process that built it; run it with the sequential (or vectorized) "
                "executor, not in worker processes.")
        return self.attack.attack(self.honest, params, data, info, self.colluders)


def choose_attackers(client_ids: Sequence[str], fraction_or_count: float | int,
                     seed: int) -> list[str]:
    """Which clients attack: ``fraction_or_count`` of ``client_ids`` (a float in ``[0, 1]``:
    ``floor(fraction * n)`` of them, at least one when the fraction is > 0; an int: that many),
    drawn without replacement from ``seed``, returned in the order of ``client_ids``."""
    n = len(client_ids)
    if isinstance(fraction_or_count, bool):
        raise ConfigError("choose_attackers: pass a fraction (float) or a count (int), not a bool.")
    if isinstance(fraction_or_count, int):
        count = fraction_or_count
        if not 0 <= count <= n:
            raise ConfigError(f"choose_attackers: count must be in [0, {n}] (got {count}).")
    else:
        f = float(fraction_or_count)
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"choose_attackers: fraction must be in [0, 1] (got {f}).")
        count = 0 if f == 0 else min(n, max(1, math.floor(f * n + 1e-9)))
    picked = numpy_rng(seed, "attackers").choice(n, size=count, replace=False)
    return [client_ids[i] for i in sorted(int(p) for p in picked)]
