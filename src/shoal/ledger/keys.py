"""Where the ledger keeps what, in its key-value store (the layout RBAC permissions follow).

::

    ROOT/registry/DEVICE                         enrollment: the device's Ed25519 public key
    ROOT/revoked/DEVICE                          revocation: when and why (registrar only)
    ROOT/peers/DEVICE/JOB/ROUND/KIND             the device's signed entries (its own prefix)

The registrar (``shoal swarm enroll``) alone writes ``registry/`` and ``revoked/``; an
enrolled device may read everything under ``ROOT/`` and write only under
``ROOT/peers/DEVICE/`` — in etcd, by a role per device (:mod:`shoal.ledger.enroll`).

Within its prefix a device may write *any* key, as many as it likes: nothing but the ledger's
own reading decides which are entries. So the ledger reads rounds by their exact entry keys
(:func:`entry_key`, three per device and round) and treats every other key as junk that no
reader parses (:func:`parse_entry_key` says which keys are entry keys).
"""

from __future__ import annotations

import json

__all__ = ["DEFAULT_ROOT", "KINDS", "entry_key", "parse_entry_key", "peer_prefix", "peers_prefix",
           "registry_key", "registry_prefix", "registry_value", "revoked_key", "revoked_prefix",
           "round_prefix"]

KINDS: tuple[str, ...] = ("update", "close", "merged")
"""The kinds of entry, in the order a device writes them in a round (the last part of an
entry key; :data:`shoal.ledger.entry.KINDS` is this tuple)."""

DEFAULT_ROOT = "/shoal"


def registry_prefix(root: str = DEFAULT_ROOT) -> str:
    """Where enrolled devices' public keys are."""
    return f"{root}/registry/"


def registry_key(device: str, root: str = DEFAULT_ROOT) -> str:
    """Where ``device``'s public key is recorded."""
    return f"{registry_prefix(root)}{device}"


def registry_value(device: str, public_key: bytes) -> bytes:
    """What enrollment records for ``device``: its raw Ed25519 public key, hex."""
    return json.dumps({"device": device, "public_key": public_key.hex()},
                      sort_keys=True).encode()


def revoked_prefix(root: str = DEFAULT_ROOT) -> str:
    """Where revocations are recorded."""
    return f"{root}/revoked/"


def revoked_key(device: str, root: str = DEFAULT_ROOT) -> str:
    """Where ``device``'s revocation is recorded."""
    return f"{revoked_prefix(root)}{device}"


def peers_prefix(root: str = DEFAULT_ROOT) -> str:
    """Where every device's entries are (each under its own :func:`peer_prefix`)."""
    return f"{root}/peers/"


def peer_prefix(device: str, root: str = DEFAULT_ROOT) -> str:
    """The one prefix ``device`` may write under."""
    return f"{root}/peers/{device}/"


def round_prefix(device: str, job: str, round: int, root: str = DEFAULT_ROOT) -> str:
    """``device``'s entries of ``job``'s ``round``."""
    return f"{peer_prefix(device, root)}{job}/{round:08d}/"


def entry_key(device: str, job: str, round: int, kind: str, root: str = DEFAULT_ROOT) -> str:
    """The key of one entry (written once)."""
    return f"{round_prefix(device, job, round, root)}{kind}"


def parse_entry_key(key: str, root: str = DEFAULT_ROOT) -> tuple[str, str, int, str] | None:
    """``(device, job, round, kind)`` of ``key`` when it is exactly what :func:`entry_key`
    writes (a canonical round of at least 8 digits, a kind of :data:`KINDS`); ``None`` for
    any other key."""
    rest = key.removeprefix(peers_prefix(root))
    if rest == key:
        return None
    parts = rest.split("/")
    if len(parts) != 4:
        return None
    device, job, digits, kind = parts
    if (not device or not job or kind not in KINDS or len(digits) < 8
            or not (digits.isascii() and digits.isdigit()) or f"{int(digits):08d}" != digits):
        return None
    return device, job, int(digits), kind
