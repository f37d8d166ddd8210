"""TLS for the dashboard under ``shoal serve``: the deployment's own certificates, and only
viewers holding a viewer certificate the project's CA issued (and did not revoke).

The server presents the coordinator's certificate (``coordinator.crt`` / ``.key`` in
``network.tls_dir``, issued by ``shoal ca init``); a viewer must present a client certificate
issued by the same CA, checked in the TLS handshake (``ssl.CERT_REQUIRED`` against
``ca.crt``): a client with no certificate, or one from another CA, never gets an HTTP
response. Past the handshake the certificate must also carry the viewer role (``shoal ca
enroll NAME --viewer``: :data:`~shoal.net.ca.VIEWER_OID` in its Extended Key Usage): the app
answers any other certificate of the CA, a training client's included, with 403 and how to get
a viewer certificate (:func:`~shoal.dashboard.app.create_app`, ``viewers_only``). That check is
made over HTTP, not in the handshake, so the refused party is told why.

Revocation: the CA's ``crl.pem`` is checked in the handshake too (OpenSSL's leaf CRL check).
The file is watched like the coordinator watches it (:class:`~shoal.net.ca.RevocationList`: it
must exist and verify at start; later a changed file is taken when it parses and the CA's
signature verifies, else the last good list stays in force): every new connection is made with
a context holding the newest good list, so ``shoal ca revoke VIEWER`` (and copying the list
over) shuts the viewer out from its next connection on, without a restart.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from ..config import NetworkConfig
from ..errors import ConfigError
from ..net.ca import RevocationList, read_passphrase

__all__ = ["DashboardTLS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DashboardTLS:
    """The dashboard server's ``cert`` and ``key`` (PEM paths; ``passphrase`` when the key is
    encrypted), the project's ``ca`` certificate that viewers' certificates must chain to, and
    the CA's revocation list ``crl`` (``None``: no revocation checks)."""

    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None
    passphrase: bytes | None = field(default=None, repr=False)

    @classmethod
    def for_deployment(cls, network: NetworkConfig) -> DashboardTLS:
        """The coordinator's files in ``network.tls_dir`` (``coordinator.crt``,
        ``coordinator.key``, ``ca.crt``, ``crl.pem``), as ``shoal serve`` uses them."""
        d = Path(network.tls_dir)
        secret = (read_passphrase(network.key_passphrase_file,
                                  "config field 'network.key_passphrase_file'")
                  if network.key_passphrase_file else None)
        return cls(d / "coordinator.crt", d / "coordinator.key", d / "ca.crt", d / "crl.pem",
                   secret)

    def check(self) -> None:
        """Raise a :class:`ConfigError` naming a missing file and how to make it."""
        for what, p in (("certificate", self.cert), ("private key", self.key),
                        ("CA certificate", self.ca)):
            if not p.is_file():
                raise ConfigError(
                    f"dashboard TLS: the {what} file {str(p)!r} does not exist; the dashboard "
                    "serves with the coordinator's files in network.tls_dir (`shoal ca init` "
                    "writes them; copy coordinator.key, coordinator.crt, ca.crt and crl.pem).")

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.Config``: the certificate, key and CA files,
        ``ssl_cert_reqs=CERT_REQUIRED``, and a context factory that adds the revocation
        checks (the CRL is opened here, so a missing or forged list fails now)."""
        self.check()
        password = None
        if self.passphrase:
            try:
                password = self.passphrase.decode()
            except UnicodeDecodeError:
                raise ConfigError("dashboard TLS: the key's passphrase is not UTF-8 text; "
                                  "uvicorn takes it as text.") from None
        crl = RevocationList(self.crl, self.ca) if self.crl is not None else None
        if crl is None:
            log.warning("dashboard: revocation checks are OFF (no CRL): a viewer whose "
                        "certificate was revoked is still served.")

        def factory(config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            return _RevocationCheckingContext.create(default, crl)

        return {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key),
                "ssl_keyfile_password": password, "ssl_ca_certs": str(self.ca),
                "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_context_factory": factory}


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No session resumption: every connection presents its certificate again, and is checked
    # against the revocation list in force then.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


class _RevocationCheckingContext(ssl.SSLContext):
    """An SSLContext whose connections are made by an inner context rebuilt (by uvicorn's own
    factory: certificate, key, CA, CERT_REQUIRED) whenever the revocation list changes; the
    inner context checks every client certificate against the newest good list.

    asyncio makes each server-side TLS connection with ``wrap_bio``; this class hands that call
    to the current inner context."""

    _default: Callable[[], ssl.SSLContext]
    _crl: RevocationList | None
    _inner: ssl.SSLContext
    _serials: frozenset[int] | None

    @classmethod
    def create(cls, default: Callable[[], ssl.SSLContext],
               crl: RevocationList | None) -> ssl.SSLContext:
        """The context for uvicorn (a plain hardened one when there is no CRL)."""
        if crl is None:
            return _harden(default())
        ctx = cls(ssl.PROTOCOL_TLS_SERVER)
        ctx._default, ctx._crl, ctx._serials = default, crl, None
        ctx._current()  # the first list must load: a failure here stops the start
        return ctx

    def _current(self) -> ssl.SSLContext:
        assert self._crl is not None
        serials = frozenset(self._crl.serials())  # re-reads the file when it changed
        if serials != self._serials:
            try:
                self._inner = self._build()
                self._serials = serials
                log.info("dashboard: revocation list loaded (%d revoked certificate(s))",
                         len(serials))
            except (OSError, ValueError, ssl.SSLError) as e:
                if self._serials is None:
                    raise ConfigError(f"dashboard TLS: cannot load the revocation list "
                                      f"{str(self._crl.path)!r}: {e}") from None
                log.warning("dashboard: the revocation list changed but could not be loaded "
                            "(%s); keeping the last good list in force", e)
        return self._inner

    def _build(self) -> ssl.SSLContext:
        """A context from uvicorn's factory with the CRL file's current content, checked like
        :class:`RevocationList` checks it (parses, signed by the CA)."""
        assert self._crl is not None
        data = self._crl.path.read_bytes()
        crl = x509.load_pem_x509_crl(data)
        if not crl.is_signature_valid(self._crl.ca.public_key()):  # type: ignore[arg-type]
            raise ValueError("it is not signed by this project's CA")
        ctx = _harden(self._default())
        # OpenSSL reads CRLs from a file only (cadata takes certificates): a private copy of
        # exactly the bytes verified above, removed at once.
        fd, tmp = tempfile.mkstemp(prefix="shoal-dashboard-crl-", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            ctx.load_verify_locations(cafile=tmp)
        finally:
            os.unlink(tmp)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return ctx

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        """Make the connection with the context of the newest revocation list."""
        return self._current().wrap_bio(incoming, outgoing, server_side=server_side,
                                        server_hostname=server_hostname, session=session)

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        """The same for blocking sockets."""
        return self._current().wrap_socket(sock, *args, **kwargs)
