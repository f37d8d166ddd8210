"""Enrollment: the registrar admits a device to the swarm's ledger, and revokes it.

A device needs three things to take part, and the registrar gives them together so that none
exists without the others:

* a TLS certificate from the project's CA (client *and* server: peers connect to the ledger's
  members and also serve their weight blobs to each other) — its CN is the device's id;
* an Ed25519 signing key for its ledger entries (``DEVICE.sign.key``, mode 0600, optionally
  encrypted), whose public key is recorded under ``ROOT/registry/DEVICE`` (write once): the
  ledger verifies every entry against it, so even the store's administrator cannot forge one;
* access: in etcd a user named after the CN (no password) with the role
  ``shoal-peer-DEVICE`` — READ on all of ``ROOT/``, READWRITE on ``ROOT/peers/DEVICE/`` only.

Revocation undoes all three: the CA revokes the certificate (the members refuse new
connections), the etcd user and role are deleted (refusing requests on connections the device
already holds), and ``ROOT/revoked/DEVICE`` records when and why, from which revision on the
ledger refuses the device's entries.

Access goes through an explicit :class:`AccessControl`: :class:`~shoal.ledger.etcd.EtcdAccess`
for etcd (what :class:`Registrar` uses for an :class:`~shoal.ledger.etcd.EtcdStore`), and
:class:`RecordedAccess` for an in-process store (simulation), which records the grants so that
tests can assert them. A store without RBAC is never given access silently: the registrar
refuses it unless an :class:`AccessControl` is passed.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import ConfigError
from ..net.ca import (
    NODE_ID_PATTERN,
    RESERVED_NODE_IDS,
    CertificateAuthority,
    Identity,
    write_private,
)
from .keys import DEFAULT_ROOT, peer_prefix, registry_key, registry_value, revoked_key
from .store import KeyValueStore

__all__ = ["RESERVED_IDS", "AccessControl", "AdminStore", "Ed25519Signer", "Grant",
           "RecordedAccess", "Registrar", "SwarmIdentity", "load_signing_key"]

RESERVED_IDS = RESERVED_NODE_IDS
"""Ids no device may have: etcd's superuser, the registrar, the federated coordinator (and
``etcd-*``, the members of :class:`~shoal.ledger.etcd.EtcdCluster`); the CA's own list."""


class AdminStore(KeyValueStore, Protocol):
    """A :class:`~shoal.ledger.store.KeyValueStore` with an administrator's ``put`` and
    ``delete`` (:class:`~shoal.ledger.etcd.EtcdStore`, :class:`~shoal.ledger.store.MemoryStore`)."""

    def put(self, key: str, value: bytes) -> int:
        """Overwrite ``key``; the write's revision."""
        ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it existed."""
        ...


class AccessControl(Protocol):
    """Who may read and write what in the ledger's store."""

    def grant(self, device: str, read_prefix: str, write_prefix: str) -> None:
        """Let ``device`` read under ``read_prefix`` and read and write under
        ``write_prefix``, nothing else."""
        ...

    def revoke(self, device: str) -> None:
        """Take every permission of ``device`` away (idempotent)."""
        ...


@dataclass(frozen=True)
class Grant:
    """What :class:`RecordedAccess` granted one device."""

    read_prefix: str
    write_prefix: str


class RecordedAccess:
    """The :class:`AccessControl` of an in-process store, which enforces nothing itself: it
    records the grants (``grants``, ``revoked``) so that a simulation can check them
    (:meth:`may_read`, :meth:`may_write`) and tests can assert them."""

    def __init__(self) -> None:
        self.grants: dict[str, Grant] = {}
        self.revoked: list[str] = []

    def __repr__(self) -> str:
        return f"RecordedAccess({sorted(self.grants)}, revoked={self.revoked})"

    def grant(self, device: str, read_prefix: str, write_prefix: str) -> None:
        """Record the grant; see :class:`AccessControl`."""
        self.grants[device] = Grant(read_prefix, write_prefix)

    def revoke(self, device: str) -> None:
        """Drop the grant and record the revocation; see :class:`AccessControl`."""
        self.grants.pop(device, None)
        self.revoked.append(device)

    def may_read(self, device: str, key: str) -> bool:
        """Whether the grants let ``device`` read ``key``."""
        g = self.grants.get(device)
        return g is not None and (key.startswith(g.read_prefix)
                                  or key.startswith(g.write_prefix))

    def may_write(self, device: str, key: str) -> bool:
        """Whether the grants let ``device`` write ``key``."""
        g = self.grants.get(device)
        return g is not None and key.startswith(g.write_prefix)


class Ed25519Signer:
    """A device's ledger signing key: the :class:`~shoal.ledger.entry.Signer` protocol."""

    def __init__(self, node_id: str, key: Ed25519PrivateKey):
        self.node_id = node_id
        self._key = key

    def __repr__(self) -> str:
        return f"Ed25519Signer({self.node_id!r}, public_key={self.credential().hex()[:16]}...)"

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of ``data`` (64 bytes)."""
        return self._key.sign(data)

    def credential(self) -> bytes:
        """The raw 32-byte public key (what the registry records)."""
        return self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)


def load_signing_key(path: str | Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """The Ed25519 signing key in the PEM file ``path``; a :class:`ConfigError` says when the
    file is missing, not a key, not Ed25519, or encrypted and the passphrase is missing or
    wrong."""
    p = Path(path)
    fix = "re-enroll the device (`shoal swarm enroll DEVICE`) or give the right file"
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"swarm: cannot read the signing key {str(p)!r} ({e.strerror}); "
                          f"expected DEVICE.sign.key written by enrollment; {fix}.") from None
    encrypted = b"ENCRYPTED" in data
    if encrypted and not passphrase:
        raise ConfigError(f"swarm: the signing key {str(p)!r} is encrypted and no passphrase "
                          "was given; pass the passphrase it was enrolled with.")
    try:
        key = serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except (ValueError, TypeError) as e:
        if encrypted:
            raise ConfigError(f"swarm: cannot decrypt the signing key {str(p)!r}: the "
                              "passphrase is wrong; pass the one it was enrolled with.") from None
        raise ConfigError(f"swarm: {str(p)!r} is not a PEM private key ({e}); {fix}.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"swarm: {str(p)!r} holds a {type(key).__name__}, expected an "
                          f"Ed25519 signing key; {fix}.")
    return key


@dataclass(frozen=True)
class SwarmIdentity:
    """What enrollment gives a device: its TLS identity (``tls``: key, certificate, CA
    certificate) and the path of its Ed25519 signing key for ledger entries."""

    device: str
    tls: Identity
    signing_key: Path
    passphrase: bytes | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, directory: str | Path, device: str,
             passphrase: bytes | None = None) -> SwarmIdentity:
        """The identity enrollment wrote for ``device`` into ``directory``
        (``DEVICE.key``, ``DEVICE.crt``, ``ca.crt``, ``DEVICE.sign.key``)."""
        d = Path(directory)
        ident = cls(device, Identity(d / f"{device}.key", d / f"{device}.crt", d / "ca.crt",
                                     passphrase), d / f"{device}.sign.key", passphrase)
        missing = [str(p) for p in (ident.tls.key, ident.tls.cert, ident.tls.ca,
                                    ident.signing_key) if not p.is_file()]
        if missing:
            raise ConfigError(f"swarm: {device!r} has no enrollment in {str(d)!r} (missing "
                              f"{', '.join(missing)}); enroll it with `shoal swarm enroll "
                              f"{device}` and copy the files it writes to that directory.")
        return ident

    def signer(self, passphrase: bytes | None = None) -> Ed25519Signer:
        """The device's signer (:class:`~shoal.ledger.entry.Signer`), its key decrypted with
        ``passphrase`` (else :attr:`passphrase`) when it is encrypted."""
        return Ed25519Signer(self.device,
                             load_signing_key(self.signing_key, passphrase or self.passphrase))


class Registrar:
    """The registrar's side of enrollment (see the module docstring).

    Args:
        store_admin: the ledger's store as an administrator (an
            :class:`~shoal.ledger.etcd.EtcdStore` opened with the ``registrar`` identity,
            or a :class:`~shoal.ledger.store.MemoryStore`).
        ca: the project's CA, which issues and revokes the devices' certificates.
        root: the ledger's root prefix.
        access: who may read and write what; default: the store's own (``store.access()``,
            etcd's RBAC). A store without one (in-process) needs it passed explicitly, e.g.
            :class:`RecordedAccess`.
    """

    def __init__(self, store_admin: AdminStore, ca: CertificateAuthority,
                 root: str = DEFAULT_ROOT, *, access: AccessControl | None = None):
        if access is None:
            make = getattr(store_admin, "access", None)
            if not callable(make):
                raise ConfigError(
                    f"Registrar: the store {store_admin!r} enforces no access control of its "
                    "own; pass access=RecordedAccess() to record the grants in-process "
                    "(simulation), or use an EtcdStore, whose RBAC enforces them.")
            access = make()
        self.store = store_admin
        self.ca = ca
        self.root = root
        self.access: AccessControl = access

    def __repr__(self) -> str:
        return f"Registrar({self.store!r}, root={self.root!r})"

    def _record(self, key: str) -> bytes | None:
        (records,), _ = self.store.ranges([key])
        return next((r.value for r in records if r.key == key), None)

    def enroll(self, device: str, out_dir: str | Path, *,
               hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
               passphrase: bytes | None = None) -> SwarmIdentity:
        """Enroll ``device``: issue its TLS certificate (server and client, valid for
        ``hosts``) and Ed25519 signing key into ``out_dir`` (keys mode 0600, encrypted with
        ``passphrase`` when given), grant its access, and record its public key in the
        registry. An id already enrolled (or revoked: its history stays on the ledger) or
        reserved is a :class:`ConfigError`."""
        if not NODE_ID_PATTERN.match(device):
            raise ConfigError(f"swarm: device id {device!r} is not allowed; expected 1-64 "
                              "letters, digits, '.', '_' or '-', starting with a letter or digit.")
        if device in RESERVED_IDS or device.startswith("etcd-"):
            raise ConfigError(f"swarm: {device!r} is reserved (etcd's superuser, the registrar, "
                              "the coordinator and etcd members); enroll the device under "
                              "another id.")
        if self._record(revoked_key(device, self.root)) is not None:
            raise ConfigError(f"swarm: {device!r} was revoked; its entries stay on the ledger "
                              "under that id, so enroll the device under a new id.")
        if self._record(registry_key(device, self.root)) is not None:
            raise ConfigError(f"swarm: {device!r} is already enrolled; revoke it first "
                              f"(`shoal swarm revoke {device}`) and enroll under a new id, or "
                              "use its existing files.")
        out = Path(out_dir)
        tls = self.ca.issue(device, out, hosts=hosts, server=True, client=True,
                            passphrase=passphrase)
        key = Ed25519PrivateKey.generate()
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase
            else serialization.NoEncryption())
        signing = out / f"{device}.sign.key"
        write_private(signing, key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8, enc))
        ident = SwarmIdentity(device, tls, signing, passphrase)
        public = Ed25519Signer(device, key).credential()
        self.access.grant(device, f"{self.root}/", peer_prefix(device, self.root))
        if self.store.create(registry_key(device, self.root),
                             registry_value(device, public)) is None:
            raise ConfigError(f"swarm: {device!r} was enrolled by someone else meanwhile; "
                              "its registry record was not written. Enroll under another id.")
        return ident

    def revoke(self, device: str, reason: str) -> None:
        """Revoke ``device``: its certificate goes on the CA's revocation list, its access is
        taken away, and ``ROOT/revoked/DEVICE`` records ``{device, reason, time}`` (the
        ledger refuses its entries from that revision on). A device never enrolled, or
        already revoked, is a :class:`ConfigError`."""
        if self._record(registry_key(device, self.root)) is None:
            raise ConfigError(f"swarm: {device!r} is not enrolled (no "
                              f"{registry_key(device, self.root)!r}); nothing to revoke.")
        old = self._record(revoked_key(device, self.root))
        if old is not None:
            raise ConfigError(f"swarm: {device!r} is already revoked ({old.decode()}).")
        self.ca.revoke(device)
        self.access.revoke(device)
        record = json.dumps({"device": device, "reason": reason,
                             "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
                            sort_keys=True).encode()
        if self.store.create(revoked_key(device, self.root), record) is None:
            raise ConfigError(f"swarm: {device!r} was revoked by someone else meanwhile.")
