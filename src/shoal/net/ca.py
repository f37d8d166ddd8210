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
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError, TransportError

__all__ = ["CertificateAuthority", "Identity", "NODE_ID_PATTERN", "RevocationList", "peer_identity"]

NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Allowed node ids: letters, digits, ``.``, ``_`` and ``-``, at most 64 characters."""

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Identity:
    """The files a node presents: its ``key`` and ``cert`` and the project's ``ca`` certificate
    (PEM paths)."""

    key: Path
    cert: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """``(key, cert, ca)`` PEM bytes; a missing file is a :class:`ConfigError`."""
        out = []
        for what, p in (("private key", self.key), ("certificate", self.cert),
                        ("CA certificate", self.ca)):
            if not Path(p).is_file():
                raise ConfigError(f"TLS: the {what} file {str(p)!r} does not exist; create it "
                                  "with `shoal ca init` / `shoal ca enroll NODE_ID`, or pass "
                                  "--insecure for a local plain-text experiment.")
            out.append(Path(p).read_bytes())
        return out[0], out[1], out[2]


def _check_id(node_id: str) -> None:
    if not NODE_ID_PATTERN.match(node_id):
        raise ConfigError(f"node id {node_id!r} is not allowed; expected 1-64 letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit.")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    """The CA in ``directory``; :meth:`init` creates one, the constructor opens one."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / "ca.key").is_file() or not (self.dir / "ca.crt").is_file():
            raise ConfigError(f"CA: {str(self.dir)!r} holds no ca.key and ca.crt; create a CA "
                              f"with `shoal ca init --dir {self.dir}`.")
        self.key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), None)
        self.cert = x509.load_pem_x509_certificate((self.dir / "ca.crt").read_bytes())

    @classmethod
    def init(cls, directory: str | Path, *, name: str = "shoal project CA",
             hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 3650,
             ) -> CertificateAuthority:
        """Create a CA in ``directory`` (which must not hold one) with a coordinator certificate
        valid for ``hosts`` (DNS names or IP addresses clients connect to)."""
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
        (root / "ca.key").write_bytes(_key_pem(key))
        (root / "ca.key").chmod(0o600)
        (root / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(root)
        ca._write_crl([])
        ca.issue("coordinator", root, hosts=hosts, server=True)
        return ca

    def issue(self, node_id: str, out: str | Path, *, hosts: tuple[str, ...] = (),
              server: bool = False, days: int = 825) -> Identity:
        """Issue a key and certificate for ``node_id`` into ``out`` (``NODE_ID.key``,
        ``NODE_ID.crt`` and a copy of ``ca.crt``)."""
        _check_id(node_id)
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
                       [ExtendedKeyUsageOID.SERVER_AUTH if server
                        else ExtendedKeyUsageOID.CLIENT_AUTH]), False))
        if hosts:
            names: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    names.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        cert = builder.sign(self.key, hashes.SHA256())  # type: ignore[arg-type]
        pem = cert.public_bytes(serialization.Encoding.PEM)
        ident = Identity(out / f"{node_id}.key", out / f"{node_id}.crt", out / "ca.crt")
        ident.key.write_bytes(_key_pem(key))
        ident.key.chmod(0o600)
        ident.cert.write_bytes(pem)
        if ident.ca.resolve() != (self.dir / "ca.crt").resolve():
            ident.ca.write_bytes((self.dir / "ca.crt").read_bytes())
        (self.dir / "issued").mkdir(exist_ok=True)
        with open(self.dir / "issued" / f"{node_id}.crt", "ab") as f:
            f.write(pem)
        return ident

    def enroll(self, node_id: str, out: str | Path) -> Identity:
        """Issue a client certificate for ``node_id`` (its identity) into ``out``."""
        if node_id == "coordinator":
            raise ConfigError("CA: 'coordinator' is the coordinator's own id; enroll clients "
                              "under another id.")
        return self.issue(node_id, out)

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
        crl = b.sign(self.key, hashes.SHA256())  # type: ignore[arg-type]
        tmp = self.dir / "crl.pem.tmp"
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        tmp.replace(self.dir / "crl.pem")


class RevocationList:
    """The CRL at ``path``, verified against the CA certificate and re-read when it changes."""

    def __init__(self, path: str | Path, ca_cert: str | Path):
        self.path = Path(path)
        self.ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        self._mtime: float | None = None
        self._serials: set[int] = set()

    def serials(self) -> set[int]:
        """The revoked serial numbers (empty when there is no CRL file)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return set()
        if mtime != self._mtime:
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
            if not crl.is_signature_valid(self.ca.public_key()):  # type: ignore[arg-type]
                raise TransportError(f"TLS: the revocation list {str(self.path)!r} is not "
                                     "signed by this project's CA; regenerate it with "
                                     "`shoal ca revoke`.")
            self._serials = {r.serial_number for r in crl}
            self._mtime = mtime
        return set(self._serials)


def peer_identity(pem: bytes) -> tuple[str, int]:
    """``(common name, serial number)`` of a PEM certificate presented by a peer."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise TransportError("TLS: the peer certificate has no common name (node id).")
    return str(names[0].value), cert.serial_number
