"""A small certificate authority for enrolling nodes, built on ``cryptography``.

A project's CA directory holds::

    ca.key, ca.crt              the CA's private key and self-signed certificate
    coordinator.key/.crt        the coordinator's server certificate (its host names in the SAN)
    crl.pem                     the certificate revocation list, signed by the CA
    issued/NODE_ID.crt          every certificate issued (for revocation by node id)

A node's identity is the common name (CN) of its certificate: ``enroll("hospital-a")`` issues a
key and certificate whose CN is ``hospital-a``, and the coordinator binds every stream to that
name. ``revoke`` adds the node's certificates to the CRL; the coordinator re-reads it whenever it
changes and refuses revoked certificates.

Roles: ``enroll(NAME)`` issues a training client's certificate; ``enroll(NAME, viewer=True)``
(``shoal ca enroll NAME --viewer``) a dashboard viewer's. The role is marked in the certificate's
Extended Key Usage extension: a viewer's lists, beside TLS client authentication (which the TLS
handshake requires), the private purpose :data:`VIEWER_OID` (``2.25.…``, an OID under the UUID
arc of ITU-T X.667, which needs no registration). The dashboard under ``shoal serve`` admits
only certificates carrying it (:func:`is_viewer`); the coordinator refuses them as clients. One
name holds one role: a name enrolled as a client cannot be enrolled as a viewer, nor the
reverse (``revoke`` revokes every certificate of a name).

Private keys (``ca.key``, ``NODE_ID.key``) are created with mode 0600 from the first byte (never
world-readable, not even briefly) and can be encrypted with a passphrase
(``CertificateAuthority.init(..., passphrase=...)``, ``enroll(..., passphrase=...)``); an
encrypted key is read with ``Identity(..., passphrase=...)`` or ``Identity.read(passphrase)``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..config import NAME_PATTERN
from ..errors import ConfigError, TransportError

__all__ = ["RESERVED_NODE_IDS", "CertificateAuthority", "Identity", "NODE_ID_PATTERN", "RevocationList",
           "VIEWER_OID", "is_viewer", "load_private_key", "peer_identity", "read_passphrase",
           "write_private"]

RESERVED_NODE_IDS = frozenset({"coordinator", "registrar", "root"})
"""Ids :meth:`CertificateAuthority.enroll` refuses: a certificate's name is its holder's
identity, and etcd takes ``root`` and ``registrar`` as its administrators (``etcd-*``, its
members, are refused too)."""

NODE_ID_PATTERN = NAME_PATTERN
"""Allowed node ids: letters, digits, ``.``, ``_`` and ``-``, at most 64 characters."""

VIEWER_OID = x509.ObjectIdentifier("2.25.68576999410901701465582430720767759983")
"""The Extended Key Usage purpose that marks a dashboard viewer's certificate (UUID
3397731d-526e-4994-9eb6-0e903767166f under the ``2.25`` arc of ITU-T X.667: a private OID that
needs no registration). ``openssl x509 -in NAME.crt -noout -ext extendedKeyUsage`` shows it
beside ``TLS Web Client Authentication``."""

_DAY = dt.timedelta(days=1)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """The files a node presents: its ``key`` and ``cert`` and the project's ``ca`` certificate
    (PEM paths), and the ``passphrase`` of the key when it is encrypted."""

    key: Path
    cert: Path
    ca: Path
    passphrase: bytes | None = field(default=None, repr=False, compare=False)

    def read(self, passphrase: bytes | None = None) -> tuple[bytes, bytes, bytes]:
        """``(key, cert, ca)`` PEM bytes, the key decrypted (with ``passphrase``, else
        :attr:`passphrase`) when it is encrypted; a missing file, an encrypted key without a
        passphrase or a wrong passphrase is a :class:`ConfigError`."""
        out = []
        for what, p in (("private key", self.key), ("certificate", self.cert),
                        ("CA certificate", self.ca)):
            if not Path(p).is_file():
                raise ConfigError(f"TLS: the {what} file {str(p)!r} does not exist; create it "
                                  "with `shoal ca init` / `shoal ca enroll NODE_ID`, or pass "
                                  "--insecure for a local plain-text experiment.")
            out.append(Path(p).read_bytes())
        key = out[0]
        if b"ENCRYPTED" in key:
            key = _key_pem(load_private_key(self.key, passphrase or self.passphrase))
        return key, out[1], out[2]


def load_private_key(path: str | Path, passphrase: bytes | None = None) -> Any:
    """The private key in the PEM file ``path``, decrypted with ``passphrase`` when it is
    encrypted; a :class:`ConfigError` says when the passphrase is missing or wrong."""
    data = Path(path).read_bytes()
    encrypted = b"ENCRYPTED" in data
    if encrypted and not passphrase:
        raise ConfigError(f"TLS: the private key {str(path)!r} is encrypted and no passphrase "
                          "was given; pass the passphrase it was written with "
                          "(passphrase=b'...').")
    try:
        return serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except ValueError as e:
        if encrypted:
            raise ConfigError(f"TLS: cannot decrypt the private key {str(path)!r}: the "
                              "passphrase is wrong; pass the passphrase it was written "
                              "with.") from None
        raise ConfigError(f"TLS: {str(path)!r} is not a PEM private key ({e}); expected the "
                          "key written by `shoal ca init` / `shoal ca enroll`.") from None


def read_passphrase(path: str | Path, what: str) -> bytes:
    """The passphrase in the file ``path`` (one line; a trailing newline is not part of it);
    ``what`` names the setting in the error when the file is missing or empty."""
    p = Path(path)
    try:
        secret = p.read_bytes().rstrip(b"\r\n")
    except OSError as e:
        raise ConfigError(f"{what}: cannot read the passphrase file {str(p)!r} "
                          f"({e.strerror}); give a file holding the key's passphrase.") from None
    if not secret:
        raise ConfigError(f"{what}: the passphrase file {str(p)!r} is empty.")
    return secret


def write_private(path: str | Path, pem: bytes) -> None:
    """Write the private key ``pem`` to ``path`` with mode 0600 from the start: a new file is
    created in the same directory with ``O_CREAT | O_EXCL`` and mode 0600, written, and renamed
    over ``path``, so no reader ever sees the key world-readable or half written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:  # mkstemp opens with O_CREAT | O_EXCL and mode 0600
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_id(node_id: str) -> None:
    if not NODE_ID_PATTERN.match(node_id):
        raise ConfigError(f"node id {node_id!r} is not allowed; expected 1-64 letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit.")


def _key_pem(key: Any, passphrase: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    return bytes(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8, enc))


class CertificateAuthority:
    """The CA in ``directory``; :meth:`init` creates one, the constructor opens one
    (``passphrase``: the one ``ca.key`` was encrypted with, if it was)."""

    def __init__(self, directory: str | Path, passphrase: bytes | None = None):
        self.dir = Path(directory)
        if not (self.dir / "ca.key").is_file() or not (self.dir / "ca.crt").is_file():
            raise ConfigError(f"CA: {str(self.dir)!r} holds no ca.key and ca.crt; create a CA "
                              f"with `shoal ca init --dir {self.dir}`.")
        self.key = load_private_key(self.dir / "ca.key", passphrase)
        self.cert = x509.load_pem_x509_certificate((self.dir / "ca.crt").read_bytes())

    @classmethod
    def init(cls, directory: str | Path, *, name: str = "shoal project CA",
             hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 3650,
             passphrase: bytes | None = None) -> CertificateAuthority:
        """Create a CA in ``directory`` (which must not hold one) with a coordinator certificate
        valid for ``hosts`` (DNS names or IP addresses clients connect to); ``passphrase``
        encrypts ``ca.key`` (the coordinator's key is written unencrypted, mode 0600)."""
        root = Path(directory)
        if (root / "ca.key").exists():
            raise ConfigError(f"CA: {str(root)!r} already holds a CA (ca.key); refusing to "
                              "overwrite it. Use another directory.")
        root.mkdir(parents=True, exist_ok=True)
        (root / "issued").mkdir(exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _DAY).not_valid_after(now + days * _DAY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .sign(key, hashes.SHA256()))
        write_private(root / "ca.key", _key_pem(key, passphrase))
        (root / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(root, passphrase)
        ca._write_crl([])
        ca.issue("coordinator", root, hosts=hosts, server=True)
        return ca

    def _check_role(self, node_id: str, viewer: bool) -> None:
        """One name holds one role: refuse to issue ``node_id`` a viewer's certificate when it
        holds a non-viewer's (a training client, a swarm device), or the reverse. Every issuing
        path (:meth:`issue`, so :meth:`enroll` and the swarm's registrar too) checks it."""
        issued = self.dir / "issued" / f"{node_id}.crt"
        if issued.is_file():
            roles = {is_viewer(c) for c in x509.load_pem_x509_certificates(issued.read_bytes())}
            if viewer and False in roles:
                raise ConfigError(
                    f"CA: {node_id!r} is enrolled as a training client; a viewer certificate "
                    "needs a name of its own (`shoal ca revoke NAME` revokes every certificate "
                    f"of a name): enroll the viewer under another name, e.g. "
                    f"`shoal ca enroll {node_id}-viewer --viewer`.")
            if not viewer and True in roles:
                raise ConfigError(
                    f"CA: {node_id!r} is enrolled as a dashboard viewer, and a viewer is not a "
                    "training client; enroll the client under another name (`shoal ca enroll "
                    "NODE_ID`).")

    def issue(self, node_id: str, out: str | Path, *, hosts: tuple[str, ...] = (),
              server: bool = False, client: bool | None = None, days: int = 825,
              passphrase: bytes | None = None, viewer: bool = False) -> Identity:
        """Issue a key and certificate for ``node_id`` into ``out`` (``NODE_ID.key``, mode
        0600 and encrypted with ``passphrase`` when given, ``NODE_ID.crt`` and a copy of
        ``ca.crt``). The certificate authenticates a TLS server when ``server``, a TLS client
        when ``client`` (default: ``not server``); a swarm peer and an etcd member are both.
        ``viewer``: a dashboard viewer's certificate (a TLS client whose Extended Key Usage
        also lists :data:`VIEWER_OID`); it cannot be a server's or a non-client's."""
        _check_id(node_id)
        if viewer and (server or client is False):
            raise ConfigError(f"CA: a viewer certificate ({node_id!r}) authenticates a TLS "
                              "client only; issue it without server=True / client=False.")
        self._check_role(node_id, viewer)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - _DAY).not_valid_after(now + days * _DAY)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                   .add_extension(x509.ExtendedKeyUsage(
                       ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
                       + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client or (client is None
                                                                          and not server)
                          else [])
                       + ([VIEWER_OID] if viewer else [])), False))
        if hosts:
            names: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    names.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        cert = builder.sign(self.key, hashes.SHA256())
        pem = cert.public_bytes(serialization.Encoding.PEM)
        ident = Identity(out / f"{node_id}.key", out / f"{node_id}.crt", out / "ca.crt",
                         passphrase)
        write_private(ident.key, _key_pem(key, passphrase))
        ident.cert.write_bytes(pem)
        if ident.ca.resolve() != (self.dir / "ca.crt").resolve():
            ident.ca.write_bytes((self.dir / "ca.crt").read_bytes())
        (self.dir / "issued").mkdir(exist_ok=True)
        with open(self.dir / "issued" / f"{node_id}.crt", "ab") as f:
            f.write(pem)
        return ident

    def enroll(self, node_id: str, out: str | Path, *, passphrase: bytes | None = None,
               viewer: bool = False) -> Identity:
        """Issue a client certificate for ``node_id`` (its identity) into ``out``; ``passphrase``
        encrypts its key. ``viewer``: a dashboard viewer's certificate instead (it opens the
        dashboard of ``shoal serve`` and cannot join training; see the module docstring).

        A name keeps the role it was first enrolled with (enrolling it again in the same role
        replaces its key, as before): a training client's name cannot be enrolled as a viewer,
        nor the reverse, since ``revoke`` revokes every certificate of a name."""
        if node_id in RESERVED_NODE_IDS or node_id.startswith("etcd-"):
            raise ConfigError(f"CA: {node_id!r} is reserved (the coordinator, the swarm's "
                              "registrar and etcd's superuser, whose certificates carry "
                              "their powers, and etcd members); enroll the node under another "
                              "id.")
        return self.issue(node_id, out, passphrase=passphrase, viewer=viewer)

    def revoke(self, node_id: str) -> list[int]:
        """Revoke every certificate issued to ``node_id``; returns their serial numbers."""
        issued = self.dir / "issued" / f"{node_id}.crt"
        if not issued.is_file():
            raise ConfigError(f"CA: no certificate was issued to {node_id!r} by the CA in "
                              f"{str(self.dir)!r}; nothing to revoke.")
        serials = [c.serial_number for c in x509.load_pem_x509_certificates(issued.read_bytes())]
        self._write_crl(sorted(set(self.revoked()) | set(serials)))
        return serials

    def revoked(self) -> set[int]:
        """Serial numbers on the CRL."""
        return RevocationList(self.dir / "crl.pem", self.dir / "ca.crt").serials()

    def _write_crl(self, serials: list[int]) -> None:
        now = dt.datetime.now(dt.UTC)
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
             .last_update(now).next_update(now + 365 * _DAY))
        for s in serials:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
        crl = b.sign(self.key, hashes.SHA256())
        tmp = self.dir / "crl.pem.tmp"
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        tmp.replace(self.dir / "crl.pem")


class RevocationList:
    """The CRL at ``path``, verified against the CA certificate and re-read when it changes.

    The file must exist and verify when the list is opened (a :class:`TransportError` names the
    file and the fix otherwise), so revocation can never be off by accident. Later reads are
    atomic: the file is read whole and used only when it did not change during the read, it
    parses, and the CA's signature on it verifies; a truncated (half-copied), malformed,
    foreign-signed or vanished file keeps the last good list in force and logs a warning once
    per change of the file.
    """

    def __init__(self, path: str | Path, ca_cert: str | Path):
        self.path = Path(path)
        self.ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        self._seen: tuple[int, int, int] | None = None
        self._serials: set[int] = set()
        self._warned: str | None = None
        if not self.path.is_file():
            raise TransportError(
                f"TLS: the revocation list {str(self.path)!r} does not exist, so revoked "
                "certificates could not be refused; copy crl.pem from the project's CA "
                "directory (`shoal ca init` writes it, `shoal ca revoke` updates it) to that "
                "path, or pass crl=None to run without revocation checks.")
        problem = self._load()
        if problem is not None:
            raise TransportError(f"TLS: the revocation list {str(self.path)!r} {problem}; "
                                 "copy a good crl.pem from the project's CA directory "
                                 "(`shoal ca revoke` rewrites it).")

    def _load(self) -> str | None:
        """Read the file if it changed; ``None`` when the list is current, else what is wrong
        (the last good list stays in force)."""
        try:
            before = self.path.stat()
            key = (before.st_mtime_ns, before.st_size, before.st_ino)
            if key == self._seen:
                return None
            data = self.path.read_bytes()
            after = self.path.stat()
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        if (after.st_mtime_ns, after.st_size, after.st_ino) != key or len(data) != key[1]:
            return "changed while it was read (a copy in progress)"
        try:
            crl = x509.load_pem_x509_crl(data)
        except ValueError as e:
            self._seen = key
            return f"is not a valid PEM revocation list ({len(data)} bytes: {e})"
        if not crl.is_signature_valid(self.ca.public_key()):  # type: ignore[arg-type]
            self._seen = key
            return "is not signed by this project's CA"
        self._serials = {r.serial_number for r in crl}
        self._seen = key
        return None

    def serials(self) -> set[int]:
        """The revoked serial numbers: the newest good list (a bad file keeps the last one)."""
        problem = self._load()
        if problem is None:
            self._warned = None
        elif problem != self._warned:  # once per problem, not on every connection
            self._warned = problem
            log.warning("the revocation list %r %s; keeping the last good list (%d revoked "
                        "serial(s)) in force. Copy crl.pem from the CA directory atomically "
                        "(write a temporary file, then rename it over crl.pem).",
                        str(self.path), problem, len(self._serials))
        return set(self._serials)


def is_viewer(cert: x509.Certificate | bytes) -> bool:
    """Whether ``cert`` (a certificate, or its PEM or DER bytes) is a dashboard viewer's: its
    Extended Key Usage lists :data:`VIEWER_OID` (``CertificateAuthority.enroll(...,
    viewer=True)``). A certificate without the extension is not a viewer's; bytes that are no
    certificate raise :class:`TransportError`."""
    if isinstance(cert, bytes):
        try:
            cert = (x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----")
                    else x509.load_der_x509_certificate(cert))
        except ValueError as e:
            raise TransportError(f"TLS: the peer certificate cannot be read ({e}).") from None
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return VIEWER_OID in usage


def peer_identity(pem: bytes) -> tuple[str, int]:
    """``(common name, serial number)`` of a PEM certificate presented by a peer."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise TransportError("TLS: the peer certificate has no common name (node id).")
    return str(names[0].value), cert.serial_number
