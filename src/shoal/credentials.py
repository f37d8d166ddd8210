"""Credentials: how a node signs what it says and checks what its peers signed.

Protocols that must hold against a deviating coordinator (secure aggregation's consistency
round, signed public keys) need signatures the coordinator can neither forge nor swap. A node's
``NodeContext.credentials`` signs for it and verifies a peer's signature against that peer's
*credential* (which the coordinator only forwards):

* :class:`RunKeys` — simulation: an Ed25519 key per node, derived from a per-run secret drawn
  from the OS (never from the run's seed, which the coordinator knows). The secret is the
  simulation's certificate authority: a credential is valid only if it is the key the secret
  gives that node id.
* :class:`CertificateCredentials` — deployment: the node's own key and certificate from the
  project's CA (``shoal ca enroll``); a peer's credential is its certificate, valid only if the
  CA issued it to that node id.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID

__all__ = ["CertificateCredentials", "Credentials", "RunCredentials", "RunKeys"]


class Credentials(Protocol):
    """A node's signing key and the means to check its peers'."""

    node_id: str

    def credential(self) -> bytes:
        """What a peer needs to check this node's signatures (public key or certificate)."""
        ...

    def sign(self, data: bytes) -> bytes:
        """This node's signature of ``data``."""
        ...

    def verify(self, node_id: str, credential: bytes, data: bytes,
               signature: bytes) -> str | None:
        """Why ``signature`` is not ``node_id``'s valid signature of ``data`` under
        ``credential``, or ``None`` when it is."""
        ...


class RunKeys:
    """Per-run signing keys of simulated nodes; see the module docstring. ``secret`` (32
    bytes) defaults to ``os.urandom(32)``."""

    def __init__(self, secret: bytes | None = None):
        self.secret = os.urandom(32) if secret is None else secret

    def __repr__(self) -> str:
        return "RunKeys(secret)"

    def _private(self, node_id: str) -> Ed25519PrivateKey:
        seed = hashlib.sha256(b"shoal-run-key\x00" + self.secret + node_id.encode()).digest()
        return Ed25519PrivateKey.from_private_bytes(seed)

    def public(self, node_id: str) -> bytes:
        """Node ``node_id``'s public key (raw, 32 bytes)."""
        return self._private(node_id).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def for_node(self, node_id: str) -> RunCredentials:
        """The credentials node ``node_id`` holds."""
        return RunCredentials(self, node_id)


class RunCredentials:
    """One simulated node's credentials from :class:`RunKeys`."""

    def __init__(self, keys: RunKeys, node_id: str):
        self.keys = keys
        self.node_id = node_id

    def __repr__(self) -> str:
        return f"RunCredentials({self.node_id!r})"

    def credential(self) -> bytes:
        """This node's public key."""
        return self.keys.public(self.node_id)

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``."""
        return self.keys._private(self.node_id).sign(data)

    def verify(self, node_id: str, credential: bytes, data: bytes,
               signature: bytes) -> str | None:
        """Valid only under the key this run gives ``node_id``."""
        if credential != self.keys.public(node_id):
            return f"the key presented for {node_id!r} is not the key this run gave it"
        try:
            Ed25519PublicKey.from_public_bytes(credential).verify(signature, data)
        except InvalidSignature:
            return f"the signature of {node_id!r} does not verify"
        return None


class CertificateCredentials:
    """A deployed node's credentials: its CA-issued key and certificate, and the CA's
    certificate to check its peers' (PEM files, as ``shoal ca enroll`` writes them)."""

    def __init__(self, node_id: str, key: str | Path, cert: str | Path, ca: str | Path):
        self._init(node_id, Path(key).read_bytes(), Path(cert).read_bytes(),
                   Path(ca).read_bytes())

    @classmethod
    def from_pem(cls, node_id: str, key: bytes, cert: bytes, ca: bytes) -> CertificateCredentials:
        """The same from the PEM bytes themselves."""
        out = cls.__new__(cls)
        out._init(node_id, key, cert, ca)
        return out

    def _init(self, node_id: str, key: bytes, cert: bytes, ca: bytes) -> None:
        self.node_id = node_id
        self._key = serialization.load_pem_private_key(key, password=None)
        self._cert = cert
        self._ca = x509.load_pem_x509_certificate(ca)
        if not isinstance(self._key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"CertificateCredentials: the key of {node_id!r} is not an EC key "
                             "(the project's CA issues P-256 keys).")

    def __repr__(self) -> str:
        return f"CertificateCredentials({self.node_id!r})"

    def credential(self) -> bytes:
        """This node's certificate (PEM)."""
        return self._cert

    def sign(self, data: bytes) -> bytes:
        """An ECDSA-SHA256 signature with the node's key."""
        assert isinstance(self._key, ec.EllipticCurvePrivateKey)
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def verify(self, node_id: str, credential: bytes, data: bytes,
               signature: bytes) -> str | None:
        """Valid only under a certificate the project's CA issued to ``node_id``."""
        try:
            cert = x509.load_pem_x509_certificate(credential)
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            return f"the certificate presented for {node_id!r} was not issued by the project's CA"
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names or names[0].value != node_id:
            return f"the certificate presented for {node_id!r} belongs to another node"
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return f"the certificate of {node_id!r} holds no EC key"
        try:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return f"the signature of {node_id!r} does not verify"
        return None
