"""What a run cost: bytes and messages per direction, per message kind and per participant,
and each participant's compute time — the figures ``summary.json`` carries for every paradigm.

The per-round figures come from the run's metrics (``comm/*``, ``time/*``, see
:func:`shoal.run.traffic_metrics`); the per-participant ones from the transport's
:class:`~shoal.transport.TrafficStats`, which counts every message on its link (restored with
the checkpoint after a resume, so a resumed run reports the whole run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .message import COORDINATOR
from .transport import TrafficStats

__all__ = ["cost_summary"]

_KIND = "comm/bytes/"


def _total(history: Sequence[Mapping[str, Any]], key: str) -> float:
    return math.fsum(float(h.get(key, 0.0)) for h in history)


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "max": float(v.max()), "total": float(v.sum())}


def cost_summary(history: Sequence[Mapping[str, Any]], stats: TrafficStats,
                 ) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """``(summary, participants)``: the run's costs in one JSON-able dict, and the full table
    of every participant's messages, bytes and compute seconds (by node id).

    ``summary["bytes"]`` has ``down`` (sent by the coordinator), ``up`` (received by it),
    ``peer`` (between other nodes, e.g. data-parallel all-reduce), ``evaluation`` (federated
    evaluation's share of all three), ``total`` and ``by_kind``; ``summary["coordinator"]``
    its bytes and compute seconds; ``summary["clients"]`` the mean, maximum and total over the
    clients of bytes sent, bytes received and compute seconds, and their ``count``.
    """
    down, up, peer = (_total(history, f"comm/bytes_{d}") for d in ("down", "up", "peer"))
    kinds: dict[str, float] = {}
    for h in history:
        for k, v in h.items():
            if k.startswith(_KIND):
                kinds[k[len(_KIND):]] = kinds.get(k[len(_KIND):], 0.0) + float(v)
    participants = stats.participants()
    coordinator = participants.get(COORDINATOR, {})
    clients = [row for node, row in participants.items() if node != COORDINATOR]
    summary: dict[str, Any] = {
        "bytes": {"total": down + up + peer, "down": down, "up": up, "peer": peer,
                  "evaluation": _total(history, "comm/bytes_evaluation"),
                  "by_kind": dict(sorted(kinds.items()))},
        "time": {"coordinator_s": _total(history, "time/coordinator_s"),
                 "clients_s": _total(history, "time/clients_s"),
                 "rounds_s": _total(history, "time/round_s")},
        "coordinator": {"bytes_sent": coordinator.get("bytes_sent", 0.0),
                        "bytes_received": coordinator.get("bytes_received", 0.0),
                        "compute_s": _total(history, "time/coordinator_s")},
        "clients": {"count": len(clients),
                    **{f"{what}_{k}": v
                       for what in ("bytes_sent", "bytes_received", "compute_s")
                       for k, v in _spread([row[what] for row in clients]).items()}},
    }
    return summary, participants
