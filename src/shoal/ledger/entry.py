"""Ledger entries: what a device records, signed with its Ed25519 key, chained by hash.

An entry says who (``device``), in which ``job`` and ``round``, did what (``kind``):

* ``"update"`` — published an update of ``examples`` weight whose blob has SHA-256 ``blob``,
  trained from the model with hash ``base``, served at ``endpoint``;
* ``"close"`` — declared the round closed (``reason``: every peer published, or a timeout
  passed with fewer); the earliest valid close decides which updates the round merges;
* ``"merged"`` — merged the updates of ``included`` into the model with hash ``blob``.

Every entry carries ``seq`` (its place in the device's chain for the job) and ``prev``, the
hash of the device's previous entry, and is signed over its canonical JSON. So a store
administrator who rewrites an entry must forge a signature, and one who deletes or replays an
entry breaks a chain: both are detected by :meth:`shoal.ledger.Ledger.audit`, though neither
is prevented (Raft tolerates crashes, not lies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .keys import KINDS  # "update", "close", "merged": the order a device writes them in

__all__ = ["KINDS", "Entry", "Signer", "entry_hash", "sign_entry", "verify_entry"]

Kind = Literal["update", "close", "merged"]

MAX_ENTRY_BYTES = 64 * 1024
"""The largest entry the ledger reads; a bigger value is refused (a hostile device's entry
must not exhaust its readers' memory)."""


class Signer(Protocol):
    """A device's signing key: ``node_id``, ``sign(data)`` (Ed25519) and ``credential()`` —
    its raw 32-byte public key (what enrollment records in the registry)."""

    node_id: str

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``."""
        ...

    def credential(self) -> bytes:
        """The raw 32-byte public key."""
        ...


@dataclass(frozen=True)
class Entry:
    """One ledger entry; see the module docstring. ``signature`` is hex."""

    job: str
    round: int
    device: str
    kind: str
    seq: int
    prev: str = ""
    blob: str = ""
    base: str = ""
    examples: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    endpoint: str = ""
    included: tuple[str, ...] = ()
    reason: str = ""
    signature: str = ""

    def payload(self) -> bytes:
        """The canonical bytes that are signed (every field but the signature)."""
        d = dataclasses.asdict(self)
        d.pop("signature")
        d["included"] = list(self.included)
        return json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    def encode(self) -> bytes:
        """What the store holds: the payload's fields and the signature, as JSON."""
        d = json.loads(self.payload())
        d["signature"] = self.signature
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        """The entry in ``data``; :class:`ValueError` naming the problem when it is none."""
        if len(data) > MAX_ENTRY_BYTES:
            raise ValueError(f"the entry is {len(data)} bytes, more than the "
                             f"{MAX_ENTRY_BYTES} an entry may have")
        try:
            d = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"the entry is not JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError("the entry is not a JSON object")
        names = {f.name: f for f in dataclasses.fields(cls)}
        if set(d) != set(names):
            raise ValueError(f"the entry's fields are {sorted(d)}, expected {sorted(names)}")
        types: dict[str, Any] = {"job": str, "round": int, "device": str, "kind": str,
                                 "seq": int, "prev": str, "blob": str, "base": str,
                                 "examples": (int, float), "metrics": dict, "endpoint": str,
                                 "included": list, "reason": str, "signature": str}
        for k, t in types.items():
            if not isinstance(d[k], t) or isinstance(d[k], bool):
                raise ValueError(f"the entry's field {k!r} is {type(d[k]).__name__}, "
                                 f"expected {t if isinstance(t, type) else 'a number'}")
        if d["kind"] not in KINDS:
            raise ValueError(f"the entry's kind is {d['kind']!r}, expected one of {KINDS}")
        metrics = d["metrics"]
        if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) for k, v in metrics.items()):
            raise ValueError("the entry's metrics are not all finite numbers under string keys")
        if not all(isinstance(x, str) for x in d["included"]):
            raise ValueError("the entry's 'included' is not a list of device ids")
        if not math.isfinite(float(d["examples"])) or d["examples"] < 0:
            raise ValueError(f"the entry's examples is {d['examples']}, expected a finite "
                             "number >= 0")
        d["examples"] = float(d["examples"])
        d["metrics"] = {k: float(v) for k, v in metrics.items()}
        d["included"] = tuple(d["included"])
        return cls(**d)


def entry_hash(entry: Entry) -> str:
    """The hash the device's next entry names as ``prev`` (SHA-256 of the signed entry)."""
    return hashlib.sha256(entry.encode()).hexdigest()


def sign_entry(entry: Entry, signer: Signer) -> Entry:
    """``entry`` signed by ``signer`` (which must be its device)."""
    if signer.node_id != entry.device:
        raise ValueError(f"device {signer.node_id!r} cannot sign an entry of "
                         f"{entry.device!r}")
    return dataclasses.replace(entry, signature=signer.sign(entry.payload()).hex())


def verify_entry(entry: Entry, public_key: bytes) -> str | None:
    """Why ``entry``'s signature is not its device's under ``public_key``, or ``None``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            bytes.fromhex(entry.signature), entry.payload())
    except (InvalidSignature, ValueError):
        return f"the signature of {entry.device!r}'s {entry.kind} entry does not verify"
    return None
