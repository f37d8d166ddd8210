"""A local etcd cluster for the swarm's ledger: tests, demos, a one-machine swarm.

:class:`EtcdCluster` starts N members of Debian's ``etcd-server`` on 127.0.0.1 with free
ports, mutual TLS between clients and members and among members (certificates from the
project's CA, its revocation list honoured), short Raft timings, bounded logs, and RBAC
bootstrapped (:meth:`~shoal.ledger.etcd.EtcdAccess.bootstrap`); it kills and restarts single
members for fault tests. ``shoal swarm ledger`` runs one until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TransportError
from ..net.ca import CertificateAuthority, Identity
from .etcd import EtcdAccess, EtcdStore

__all__ = ["ADMIN", "ETCD_BINARY", "EtcdCluster"]

ETCD_BINARY = "/usr/bin/etcd"
"""Where Debian's ``etcd-server`` installs etcd (used when ``etcd`` is not on ``PATH``)."""

ADMIN = "registrar"
"""The CN of the administrator identity :class:`EtcdCluster` issues (etcd user with role
``root``)."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> list[str]:
    """A command prefix that makes the member die (SIGKILL) with the thread that started it
    (Linux's ``PR_SET_PDEATHSIG`` through util-linux's ``setpriv``), so a crashed test run
    leaves no etcd behind; empty where ``setpriv`` is missing. (Not a ``preexec_fn``: running
    Python in the forked child trips gRPC's fork handlers, which can abort the child.)"""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


def _pump(pipe: Any, path: Path, limit: int) -> None:
    """Copy a member's output to ``path``, moving it to ``path.1`` when it passes ``limit``
    bytes (so a member's logs never take more than twice ``limit``)."""
    f = open(path, "ab")
    try:
        for line in iter(pipe.readline, b""):
            if f.tell() + len(line) > limit:
                f.close()
                os.replace(path, path.with_name(path.name + ".1"))
                f = open(path, "ab")
            f.write(line[:limit])
            f.flush()
    finally:
        f.close()
        pipe.close()


def _kill_all(procs: list[subprocess.Popen[bytes] | None]) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            with contextlib.suppress(Exception):
                p.wait(5)


class EtcdCluster:
    """A local etcd cluster of ``members`` members on 127.0.0.1, for tests, demos and a
    one-machine swarm; a context manager (:meth:`start` on enter, :meth:`stop` on exit).

    Args:
        directory: where the members' data (``member-I/``), logs (``member-I.log``, at most
            twice ``log_limit`` bytes each) and certificates (``certs/``) go; created.
        ca: the project's CA: it issues every member a certificate for TLS server and client
            use (hosts 127.0.0.1 and localhost) and the administrator identity
            (:attr:`admin`, CN ``registrar``); its ``crl.pem`` is the members' revocation
            list, read on every new connection.
        members: how many members (3 tolerates one failure).
        binary: the etcd executable (default: ``etcd`` on ``PATH``, else /usr/bin/etcd).
        heartbeat_ms, election_ms: Raft timing, short so that fail-over tests are fast.
        start_timeout: seconds to wait for a member to serve a linearizable read.
        log_limit: bytes of log per member before it rotates.

    Clients and members authenticate each other with certificates (``--client-cert-auth``,
    ``--peer-client-cert-auth``), as do members among themselves. On start RBAC is
    bootstrapped: users ``root`` and ``registrar`` (role ``root``), then auth is enabled, so
    every other certificate's CN is an etcd user with only the roles enrollment grants.

    Members are started under ``setpriv --pdeathsig KILL`` (where util-linux has it) so they
    die with the thread that started them: start and restart the cluster from a thread that
    outlives it (the main thread).
    """

    def __init__(self, directory: str | Path, ca: CertificateAuthority, *, members: int = 3,
                 binary: str | None = None, heartbeat_ms: int = 50, election_ms: int = 500,
                 start_timeout: float = 30.0, log_limit: int = 1024 * 1024):
        if members < 1:
            raise ConfigError(f"EtcdCluster: members={members}; expected at least 1 (3 "
                              "tolerates one failure).")
        exe = binary or shutil.which("etcd") or ETCD_BINARY
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise ConfigError(
                f"EtcdCluster: the etcd executable {exe!r} does not exist; install etcd "
                "(`apt-get install etcd-server`, which scripts/setup.sh does when run as root) "
                "or pass binary=PATH.")
        self.binary = exe
        self.dir = Path(directory)
        self.ca = ca
        self.members = members
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.start_timeout = start_timeout
        self.log_limit = log_limit
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self._pumps: list[threading.Thread | None] = [None] * members
        self._args: list[list[str]] = []
        self._endpoints: list[str] = []
        self._admin: Identity | None = None
        self._finalizer = weakref.finalize(self, _kill_all, self._procs)

    def __repr__(self) -> str:
        alive = sum(1 for i in range(self.members) if self.alive(i))
        return f"EtcdCluster({str(self.dir)!r}, {alive}/{self.members} members up)"

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoints(self) -> list[str]:
        """The members' client addresses (``127.0.0.1:PORT``), member 0 first."""
        return list(self._endpoints)

    @property
    def admin(self) -> Identity:
        """The administrator's identity (CN ``registrar``, etcd role ``root``)."""
        if self._admin is None:
            raise ConfigError("EtcdCluster: not started; call start() or use `with`.")
        return self._admin

    def store(self, identity: Identity | None = None, *, timeout: float = 5.0) -> EtcdStore:
        """An :class:`EtcdStore` on every member, as ``identity`` (default :attr:`admin`)."""
        return EtcdStore(self._endpoints, identity or self.admin, timeout=timeout)

    def alive(self, i: int) -> bool:
        """Whether member ``i``'s process runs."""
        p = self._procs[i]
        return p is not None and p.poll() is None

    def log_tail(self, i: int, lines: int = 15) -> str:
        """The last ``lines`` lines of member ``i``'s log."""
        path = self.dir / f"member-{i}.log"
        try:
            text = path.read_bytes()[-64 * 1024:].decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> EtcdCluster:
        """Issue certificates, start every member, wait until each serves a linearizable
        read, and bootstrap RBAC (see the class docstring); a :class:`TransportError` with
        the members' log tails when they do not come up within ``start_timeout``."""
        if self._endpoints:
            raise ConfigError("EtcdCluster: already started.")
        for i in range(self.members):
            if (self.dir / f"member-{i}").exists():
                raise ConfigError(f"EtcdCluster: {str(self.dir / f'member-{i}')!r} exists; "
                                  "start a cluster in a fresh directory.")
        certs = self.dir / "certs"
        self.dir.mkdir(parents=True, exist_ok=True)
        crl = self.ca.dir / "crl.pem"
        if not crl.is_file():
            raise ConfigError(f"EtcdCluster: the CA has no revocation list {str(crl)!r}; "
                              "create the CA with `shoal ca init`.")
        self._admin = self.ca.issue(ADMIN, certs, client=True)
        ports = _free_ports(2 * self.members)
        client = [f"127.0.0.1:{ports[2 * i]}" for i in range(self.members)]
        peer = [f"https://127.0.0.1:{ports[2 * i + 1]}" for i in range(self.members)]
        initial = ",".join(f"member-{i}={peer[i]}" for i in range(self.members))
        token = f"shoal-{uuid.uuid4().hex[:12]}"
        for i in range(self.members):
            ident = self.ca.issue(f"etcd-member-{i}", certs, hosts=("127.0.0.1", "localhost"),
                                  server=True, client=True)
            self._args.append([
                self.binary, "--name", f"member-{i}", "--data-dir", str(self.dir / f"member-{i}"),
                "--listen-client-urls", f"https://{client[i]}",
                "--advertise-client-urls", f"https://{client[i]}",
                "--listen-peer-urls", peer[i], "--initial-advertise-peer-urls", peer[i],
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", token,
                "--cert-file", str(ident.cert), "--key-file", str(ident.key),
                "--trusted-ca-file", str(ident.ca), "--client-cert-auth",
                "--client-crl-file", str(crl),
                "--peer-cert-file", str(ident.cert), "--peer-key-file", str(ident.key),
                "--peer-trusted-ca-file", str(ident.ca), "--peer-client-cert-auth",
                "--peer-crl-file", str(crl),
                "--heartbeat-interval", str(self.heartbeat_ms),
                "--election-timeout", str(self.election_ms),
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"])
        self._endpoints = client
        try:
            for i in range(self.members):
                self._spawn(i)
            for i in range(self.members):
                self._wait_ready(i)
            with self.store(timeout=max(5.0, self.election_ms / 100)) as s:
                EtcdAccess(s).bootstrap(ADMIN)
            for i in range(self.members):
                self._wait_ready(i)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, i: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        proc = subprocess.Popen(_die_with_parent() + self._args[i], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self._procs[i] = proc
        pump = threading.Thread(target=_pump, name=f"etcd-member-{i}-log", daemon=True,
                                args=(proc.stdout, self.dir / f"member-{i}.log", self.log_limit))
        pump.start()
        self._pumps[i] = pump

    def _wait_ready(self, i: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        problem = ""
        with EtcdStore([self._endpoints[i]], self.admin, timeout=1.0) as s:
            while time.monotonic() < deadline:
                proc = self._procs[i]
                if proc is None or proc.poll() is not None:
                    code = None if proc is None else proc.returncode
                    raise TransportError(
                        f"etcd member {i} ({self._endpoints[i]}) exited with code {code} while "
                        f"starting; the end of its log:\n{self.log_tail(i)}")
                try:
                    s.ping(timeout=1.0)
                    return
                except TransportError as e:
                    problem = str(e)
                    time.sleep(0.1)
        tails = "\n".join(f"--- member-{j}.log ---\n{self.log_tail(j)}"
                          for j in range(self.members))
        raise TransportError(
            f"etcd member {i} ({self._endpoints[i]}) did not serve a linearizable read within "
            f"{self.start_timeout:g} s (last: {problem}); the ends of the members' logs:\n"
            f"{tails}")

    def leader(self, timeout: float = 5.0) -> int:
        """The index of the member that leads now (asked of the running members in turn)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ep in enumerate(self._endpoints):
                if not self.alive(i):
                    continue
                with EtcdStore([ep], self.admin, timeout=1.0) as s:
                    try:
                        if s.leads():
                            return i
                    except TransportError:
                        continue
            if time.monotonic() >= deadline:
                raise TransportError(f"etcd: no member of {self._endpoints} leads after "
                                     f"{timeout:g} s (is a majority running?).")
            time.sleep(0.1)

    def kill(self, i: int) -> None:
        """Kill member ``i`` (SIGKILL: a crash) and wait for it to exit."""
        proc = self._procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._join_pump(i)

    def restart(self, i: int) -> None:
        """Start member ``i`` again on its data directory and ports, and wait until it serves
        a linearizable read."""
        if self.alive(i):
            raise ConfigError(f"EtcdCluster: member {i} is running; kill({i}) it first.")
        self._join_pump(i)
        self._spawn(i)
        self._wait_ready(i)

    def _join_pump(self, i: int) -> None:
        t = self._pumps[i]
        if t is not None:
            t.join(5)
            self._pumps[i] = None

    def stop(self, grace: float = 2.0) -> None:
        """Stop every member: SIGTERM, then SIGKILL for those still running after ``grace``
        seconds (when all members stop at once, a leader waits in vain to hand its
        leadership over; etcd is crash-safe, its log is synced); idempotent."""
        for p in self._procs:
            if p is not None and p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for i, p in enumerate(self._procs):
            if p is not None:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            self._join_pump(i)
