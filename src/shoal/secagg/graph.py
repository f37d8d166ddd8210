"""The neighbour graph of SecAgg+ (Bell et al. 2020): who masks with, and holds shares of, whom.

Each client is joined to ``k = O(log n)`` others instead of all ``n - 1`` (Bonawitz et al.
2017), which cuts a client's work from O(n) to O(log n) masks. Following Bell et al., the graph
is a Harary graph H(n, k) (``k``-regular) over a random permutation of the clients, drawn from
the run's seed and the session, so it is public and reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError
from ..seeding import numpy_rng

__all__ = ["check_threshold", "default_neighbours", "neighbour_graph", "shamir_threshold"]


def default_neighbours(n: int) -> int:
    """``min(n - 1, 3 * ceil(log2 n))``: 21 neighbours for 100 clients, 27 for 500."""
    if n <= 1:
        return 0
    return min(n - 1, 3 * math.ceil(math.log2(n)))


def shamir_threshold(k: int, fraction: float) -> int:
    """The Shamir threshold for ``k`` neighbours: ``ceil(fraction * k)``, at least more than
    half of them (``k // 2 + 1``) and at most ``k``.

    ``t`` colluding neighbours plus the coordinator could unmask a client; a neighbourhood with
    fewer than ``t`` survivors cannot be unmasked; and above ``k / 2`` no split of a client's
    neighbours yields ``t`` shares of both of its secrets (see :mod:`shoal.secagg.protocol`).
    """
    check_threshold(fraction)
    return max(1, min(k, max(k // 2 + 1, math.ceil(fraction * k))))


def check_threshold(fraction: float) -> None:
    """Refuse a threshold that is not more than half of the neighbours."""
    if not 0.5 < fraction <= 1:
        raise ConfigError(
            f"secure_aggregation: threshold must be a fraction of the neighbours in (0.5, 1] "
            f"(got {fraction:g}): at or below one half, a coordinator that tells some "
            "neighbours a client survived and the others that it dropped could collect both "
            "of its secrets and unmask its input.")


def neighbour_graph(ids: Sequence[str], k: int, seed: int, session: str) -> dict[str, list[str]]:
    """A random ``k``-regular graph over ``ids``: each id's sorted neighbour list.

    ``k >= len(ids) - 1`` gives the complete graph (plain SecAgg). A Harary graph needs ``n * k``
    even, so an odd ``k`` with an odd number of clients becomes ``k + 1``.
    """
    n = len(ids)
    if k < 1:
        raise ConfigError(f"secagg: each client needs at least 1 neighbour (got {k}).")
    if k >= n - 1:
        return {u: sorted(v for v in ids if v != u) for u in ids}
    if (n * k) % 2:
        k += 1
    order = [ids[i] for i in numpy_rng(seed, "secagg-graph", session).permutation(n)]
    pos = {u: i for i, u in enumerate(order)}
    out: dict[str, list[str]] = {}
    for u in ids:
        i = pos[u]
        near = {order[(i + d) % n] for d in range(1, k // 2 + 1)}
        near |= {order[(i - d) % n] for d in range(1, k // 2 + 1)}
        if k % 2:
            near.add(order[(i + n // 2) % n])
        out[u] = sorted(near)
    return out
