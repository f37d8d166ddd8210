"""ε in every round's metrics, and a privacy budget that ends training before it is exceeded.

A *ledger* answers "what is ε (at δ) after rounds 1..r?" as a pure function of the round number,
the run's seed and the population, so it gives the same answer after a resume as in an
uninterrupted run; nothing is accumulated in hidden state (caches only).

* :class:`UserLevelLedger` — DP-FedAvg: one subsampled Gaussian per round on the client level,
  sampled as the algorithm's own :class:`~shoal.algorithms.cohort.Cohort` samples (Poisson:
  add/remove adjacency; fixed size without replacement: replace-one adjacency, RDP only).
* :class:`DistributedLedger` — distributed DP: the same event every round, composed over the
  rounds with no sampling amplification (the coordinator picks the cohort).
* :class:`SampleLevelLedger` — DP-SGD on every client: each client's accountant composes its
  round event (``steps`` x PoissonSampled(q, Gaussian(σ))) over the rounds it was sampled in,
  re-derived from the seeded cohort draws. The run's ε is the worst client's.

:class:`PrivacyAccounting` (a callback) writes ``dp/epsilon`` and ``dp/delta`` after every round
and, given a ``target_epsilon``, stops the run *before* the first round that would exceed it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..algorithm import RoundReport
from ..algorithms.cohort import Cohort
from ..errors import ConfigError
from ..run import Callback, RunContext
from .accounting import (
    AccountantKind,
    Sampling,
    check_noise,
    epsilon,
    gaussian_event,
    make_accountant,
)
from .distributed import DistributedDP
from .dpsgd import DPSGD

__all__ = ["DistributedLedger", "PrivacyAccounting", "PrivacyLedger", "SampleLevelLedger",
           "UserLevelLedger", "cohort_sampling"]


class PrivacyLedger(Protocol):
    """Answers the worst privacy unit's ε at ``delta`` after rounds ``1..round``."""

    def epsilon_after(self, ctx: RunContext, round: int, delta: float) -> float:
        """ε at ``delta`` of the worst privacy unit after rounds ``1..round``."""
        ...


def cohort_sampling(cohort: Cohort, population: int) -> tuple[float, Sampling]:
    """``(rate, sampling)``: how ``cohort`` samples clients, for the accountant.

    A cohort of everyone is the full-batch Gaussian (rate 1, no amplification).
    """
    if cohort.size is None:
        return 1.0, "poisson"
    if cohort.mode == "poisson":
        return float(cohort.size), "poisson"
    size = cohort.size if isinstance(cohort.size, int) else None
    rate = (min(size, population) / population if size is not None
            else cohort.expected_size(population) / population)
    if rate >= 1:
        return 1.0, "poisson"
    return rate, "fixed"


class UserLevelLedger:
    """ε of DP-FedAvg after r rounds: r subsampled Gaussians with multiplier z on clients.

    Every round counts, also a failed one (an upper bound: a failed round releases nothing).
    """

    def __init__(self, noise_multiplier: float, cohort: Cohort,
                 accountant: AccountantKind = "pld"):
        check_noise(noise_multiplier, accountant)
        self.noise_multiplier = float(noise_multiplier)
        self.cohort = cohort
        self.accountant = accountant

    def __repr__(self) -> str:
        return (f"UserLevelLedger(noise_multiplier={self.noise_multiplier:g}, {self.cohort!r}, "
                f"{self.accountant!r})")

    def check(self, population: int) -> None:
        """Fail now if the accountant cannot account this cohort's sampling."""
        make_accountant(self.accountant, cohort_sampling(self.cohort, population)[1])

    def epsilon_after(self, ctx: RunContext, round: int, delta: float) -> float:
        """ε at ``delta`` after ``round`` rounds over ``ctx.transport``'s population."""
        return self._epsilon(len(ctx.transport.nodes()), round, delta)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (a cache of a pure function)
    def _epsilon(self, population: int, round: int, delta: float) -> float:
        rate, sampling = cohort_sampling(self.cohort, population)
        event = gaussian_event(self.noise_multiplier, rate, round, sampling=sampling,
                               population=population)
        return epsilon(event, delta, self.accountant, sampling)


class DistributedLedger:
    """ε of distributed DP after r rounds: r releases of the stage's noisy sum, every round
    counted (also a failed one, an upper bound)."""

    def __init__(self, stage: DistributedDP):
        self.stage = stage

    def __repr__(self) -> str:
        return f"DistributedLedger({self.stage!r})"

    def epsilon_after(self, ctx: RunContext, round: int, delta: float) -> float:
        """ε at ``delta`` after ``round`` rounds."""
        return self._epsilon(round, delta)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (a cache of a pure function)
    def _epsilon(self, round: int, delta: float) -> float:
        return self.stage.epsilon(round, delta)


class SampleLevelLedger:
    """Each client's DP-SGD accountant, rebuilt from the seeded cohort draws.

    Args:
        update: the clients' :class:`DPSGD` (its event depends on a client's size only).
        num_examples: ``fn(client_id) -> examples`` it trains on.
        cohort, seed: the algorithm's cohort sampling and run seed (``algorithm.cohort``,
            ``algorithm.seed``), so the participation counted is the participation drawn.
    """

    def __init__(self, update: DPSGD, num_examples: Callable[[str], int], cohort: Cohort,
                 seed: int, accountant: AccountantKind = "pld"):
        check_noise(update.noise_multiplier, accountant)
        self.update = update
        self.num_examples = num_examples
        self.cohort = cohort
        self.seed = seed
        self.accountant = accountant
        self._snapshots: list[dict[str, int]] = [{}]  # a cache, rebuilt from the seed
        self._population: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"SampleLevelLedger({self.update!r}, {self.cohort!r}, {self.accountant!r})"

    def participation(self, population: Sequence[str], round: int) -> dict[str, int]:
        """How many of rounds ``1..round`` each client was sampled in (a dropout counts too)."""
        pop = tuple(population)
        if pop != self._population:
            self._snapshots, self._population = [{}], pop
        while len(self._snapshots) <= round:  # snapshot r: counts after rounds 1..r
            counts = dict(self._snapshots[-1])
            for cid in self.cohort.sample(population, self.seed, len(self._snapshots)):
                counts[cid] = counts.get(cid, 0) + 1
            self._snapshots.append(counts)
        return self._snapshots[round]

    def client_epsilon(self, client_id: str, rounds_taken: int, delta: float) -> float:
        """ε of one client that trained in ``rounds_taken`` rounds."""
        n = self.num_examples(client_id)
        return self._epsilon(self.update.sampling_rate(n),
                             self.update.steps(n) * rounds_taken, delta)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (a cache of a pure function)
    def _epsilon(self, rate: float, steps: int, delta: float) -> float:
        event = gaussian_event(self.update.noise_multiplier, rate, steps)
        return epsilon(event, delta, self.accountant)

    def epsilon_after(self, ctx: RunContext, round: int, delta: float) -> float:
        """The worst client's ε after ``round`` rounds (0 before any participation)."""
        counts = self.participation(ctx.transport.nodes(), round)
        return max((self.client_epsilon(c, k, delta) for c, k in counts.items() if k > 0),
                   default=0.0)


class PrivacyAccounting(Callback):
    """Report ``dp/epsilon`` (and ``dp/delta``) after every round from ``ledger``; with
    ``target_epsilon``, stop before the first round whose ε would exceed it."""

    def __init__(self, ledger: PrivacyLedger, delta: float,
                 target_epsilon: float | None = None):
        if not 0 < delta < 1:
            raise ConfigError(f"PrivacyAccounting: delta must be in (0, 1) (got {delta}).")
        if target_epsilon is not None and not target_epsilon > 0:
            raise ConfigError(f"PrivacyAccounting: target_epsilon must be > 0 or None "
                              f"(got {target_epsilon}).")
        self.ledger = ledger
        self.delta = float(delta)
        self.target_epsilon = target_epsilon

    def __repr__(self) -> str:
        return (f"PrivacyAccounting({self.ledger!r}, delta={self.delta:g}, "
                f"target_epsilon={self.target_epsilon})")

    def before_round(self, ctx: RunContext, round: int) -> str | None:
        """Stop before ``round`` if it would take ε past the budget."""
        if self.target_epsilon is None:
            return None
        after = self.ledger.epsilon_after(ctx, round, self.delta)
        if after <= self.target_epsilon:
            return None
        spent = self.ledger.epsilon_after(ctx, round - 1, self.delta) if round > 1 else 0.0
        return (f"privacy budget: round {round} would raise ε to {after:.3f} > target "
                f"ε = {self.target_epsilon:g} (δ = {self.delta:g}); stopped after round "
                f"{round - 1} at ε = {spent:.3f}")

    def after_round(self, ctx: RunContext, report: RoundReport) -> None:
        """Add this round's ε."""
        report.metrics["dp/epsilon"] = self.ledger.epsilon_after(ctx, report.round, self.delta)
        report.metrics["dp/delta"] = self.delta

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        """ε and δ after the last completed round."""
        return {"epsilon": self.ledger.epsilon_after(ctx, ctx.round, self.delta),
                "delta": self.delta}
