"""The tiny comparison config the compare tests share (digits, 4 clients, 3 rounds)."""

from __future__ import annotations

from shoal.config import Config, apply_overrides, parse_config

TINY = {
    "task": {"name": "digits"},
    "data": {"num_clients": 4},
    "federated": {"rounds": 3, "clients_per_round": 2},
    "client": {"epochs": 1, "batch_size": 32},
    "checkpoint": {"keep": 5},
}


def tiny(*overrides: str) -> Config:
    """The tiny config with ``section.field=value`` overrides."""
    return parse_config(apply_overrides(TINY, overrides))
