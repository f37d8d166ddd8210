"""Cohort sampling: which clients take part in a round.

``fixed`` draws exactly ``size`` clients uniformly without replacement; ``poisson`` includes each
client independently with probability ``rate`` (the sampling that DP accounting with Poisson
subsampling assumes). The draw depends only on the run's seed and the round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..errors import ConfigError
from ..seeding import numpy_rng

__all__ = ["Cohort", "cohort"]


class Cohort:
    """Draws a round's cohort from the reachable population.

    ``size`` is a count (int >= 1) or a fraction of the population (float in (0, 1]); with
    ``mode="poisson"`` it must be a fraction: the inclusion probability.
    """

    def __init__(self, size: int | float | None = None,
                 mode: Literal["fixed", "poisson"] = "fixed"):
        if mode not in ("fixed", "poisson"):
            raise ConfigError(f"cohort: mode must be 'fixed' or 'poisson' (got {mode!r}).")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int | float):
                raise ConfigError(f"cohort: size must be a count or a fraction (got {size!r}).")
            if isinstance(size, int) and size < 1:
                raise ConfigError(f"cohort: a count must be >= 1 (got {size}).")
            if isinstance(size, float) and not 0 < size <= 1:
                raise ConfigError(f"cohort: a fraction must be in (0, 1] (got {size}).")
            if mode == "poisson" and not isinstance(size, float):
                raise ConfigError(
                    f"cohort: poisson sampling needs a fraction (inclusion probability), "
                    f"got the count {size}; pass e.g. {min(size, 100) / 1000:g} instead."
                )
        elif mode == "poisson":
            raise ConfigError("cohort: poisson sampling needs a fraction (got none).")
        self.size = size
        self.mode = mode

    def __repr__(self) -> str:
        if self.size is None:
            return "cohort(all)"
        return f"cohort({self.size!r}{', mode=' + repr(self.mode) if self.mode != 'fixed' else ''})"

    def expected_size(self, population: int) -> float:
        """The expected number of clients per round for a population of this size."""
        if self.size is None:
            return float(population)
        if isinstance(self.size, float):
            return self.size * population
        return float(min(self.size, population))

    def sample(self, population: Sequence[str], seed: int, round: int) -> list[str]:
        """The cohort of ``round``, in population order."""
        n = len(population)
        if self.size is None or n == 0:
            return list(population)
        rng = numpy_rng(seed, "cohort", round)
        if self.mode == "poisson":
            keep = rng.random(n) < float(self.size)
            return [population[i] for i in np.flatnonzero(keep).tolist()]
        k = self.size if isinstance(self.size, int) else max(1, math.floor(self.size * n + 1e-9))
        k = min(k, n)
        chosen = sorted(rng.choice(n, size=k, replace=False).tolist())
        return [population[i] for i in chosen]


def cohort(size: int | float | None = None,
           mode: Literal["fixed", "poisson"] = "fixed") -> Cohort:
    """Clients per round: a count, a fraction, or ``None`` for all; see :class:`Cohort`."""
    return Cohort(size, mode)
