"""How much one client can move a round: its weight capped, its metrics kept to its namespace.

A reply carries a weight (the examples it trained on) and metrics, both the client's claims.
Unchecked, one enrolled client that reports weight 1e30 replaces the global model in every round
it takes part in, and one that reports ``round/replied`` overwrites the coordinator's count.

* :class:`WeightCap` — the most weight a client's reply counts with: by default the number of
  examples the partition assigned to it (the coordinator builds the same partition from the same
  config, in simulation and deployment alike; a client outside it, the median assignment), or
  one number for every client. A larger claim is clipped to the cap and counted
  (``round/weights_capped``).
* :func:`client_metrics` — what of a reply's metrics the coordinator records: keys in the
  clients' namespaces (:data:`CLIENT_NAMESPACES`) only, finite numbers only, the examples a
  client claims to have trained clipped to ``EXAMPLES_FACTOR`` times its weight cap (a client
  may train several epochs, so its examples exceed its data). Anything else is refused and
  counted (``round/metrics_refused``): a client never writes the coordinator's counts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

__all__ = ["CLIENT_NAMESPACES", "EXAMPLES_FACTOR", "WeightCap", "client_metrics"]

EXAMPLES_FACTOR = 100.0
"""A client's examples trained per round count at most ``EXAMPLES_FACTOR`` times its weight cap
(whatever the weighting: with uniform weights a client's weight is 1, its examples are not)."""

CLIENT_NAMESPACES = ("train/", "client/", "dp/sampling_rate", "dp/noise_multiplier")
"""The metric keys a client's reply may carry (its training loss and steps, DP-SGD's settings,
anything under ``client/``); the coordinator's own keys (``round/``, ``comm/``, ``time/``,
``update/``, ``dp/epsilon`` ...) are refused."""


class WeightCap:
    """The largest weight a client's reply counts with.

    Args:
        assigned: the examples the partition assigned to each client, by id; a client not in
            it (a deployment with data files of its own) is capped at their median.
        fixed: one cap for every client (instead of ``assigned``).
    """

    def __init__(self, assigned: Mapping[str, float] | None = None, *,
                 fixed: float | None = None):
        if (assigned is None) == (fixed is None):
            raise ValueError("WeightCap: pass exactly one of assigned (per client) or fixed.")
        if fixed is not None and not (math.isfinite(fixed) and fixed > 0):
            raise ValueError(f"WeightCap: fixed must be a finite number > 0 (got {fixed!r}).")
        self.assigned = dict(assigned or {})
        if assigned is not None and (not self.assigned or not all(
                math.isfinite(v) and v > 0 for v in self.assigned.values())):
            raise ValueError("WeightCap: assigned needs at least one client, each with a "
                             "finite number of examples > 0.")
        self.fixed = fixed
        self._median = statistics.median(self.assigned.values()) if self.assigned else 0.0

    def __repr__(self) -> str:
        if self.fixed is not None:
            return f"WeightCap(fixed={self.fixed:g})"
        return f"WeightCap(assigned: {len(self.assigned)} clients, median {self._median:g})"

    def cap(self, client_id: str) -> float:
        """The cap of ``client_id``."""
        if self.fixed is not None:
            return self.fixed
        return self.assigned.get(client_id, self._median)

    def clip(self, client_id: str, weight: float) -> tuple[float, bool]:
        """``(weight used, whether it was clipped)`` for a claimed ``weight``."""
        cap = self.cap(client_id)
        return (cap, True) if weight > cap else (weight, False)


def client_metrics(reported: Mapping[str, Any], cap: float | None) -> tuple[dict[str, float], int]:
    """``(kept, refused)``: the metrics of a reply the coordinator records, and how many keys
    it refused (outside :data:`CLIENT_NAMESPACES`, or not a finite number)."""
    kept: dict[str, float] = {}
    refused = 0
    for key, value in reported.items():
        ok = (isinstance(key, str) and key.startswith(CLIENT_NAMESPACES)
              and isinstance(value, int | float) and not isinstance(value, bool)
              and math.isfinite(value))
        if not ok:
            refused += 1
            continue
        value = float(value)
        if key == "train/examples" and cap is not None:
            value = min(max(value, 0.0), EXAMPLES_FACTOR * cap)
        kept[key] = value
    return kept, refused
