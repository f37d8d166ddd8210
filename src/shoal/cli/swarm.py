"""Swarm commands: the ledger, enrollment and the peers.

    shoal swarm ledger --ca CA --dir DIR [--members 3]      a local etcd cluster (mutual TLS,
                                                             RBAC) until Ctrl-C
    shoal swarm enroll DEVICE --ca CA --endpoints E,.. --registrar DIR --out OUT
    shoal swarm revoke DEVICE --ca CA --endpoints E,.. --registrar DIR [--reason TEXT]
    shoal swarm join CONFIG --node-id ID --data FILE.npz [--out DIR]
    shoal swarm audit CONFIG --node-id ID                    check every device's signed chain

The registrar is whoever holds the project's CA and the etcd identity with the ``root`` role
(``registrar.key``/``registrar.crt``; ``shoal swarm ledger`` writes them to ``DIR/certs``).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..config import load_config
from ..errors import ShoalError
from . import app, console, err_console
from .net import _logging

__all__ = ["swarm_app", "swarm_audit", "swarm_enroll", "swarm_join", "swarm_ledger",
           "swarm_revoke"]

swarm_app = typer.Typer(no_args_is_help=True,
                        help="Swarm learning: the ledger, enrollment, and the peers.")
app.add_typer(swarm_app, name="swarm")

_CA = typer.Option("--ca", help="The project's CA directory (`shoal ca init`).")
_ENDPOINTS = typer.Option("--endpoints", help="The etcd members' client addresses, "
                          "comma-separated (host:port).")
_REGISTRAR = typer.Option("--registrar", help="Directory holding registrar.key, registrar.crt "
                          "and ca.crt (the etcd identity with the root role).")
_SET = typer.Option("--set", help="Override a config field: section.field=value (repeatable).")
_VERBOSE = typer.Option("--verbose", "-v", help="Log more.")
_QUIET = typer.Option("--quiet", "-q", help="Log errors only.")


def _registrar(ca: Path, endpoints: str, registrar: Path):  # -> Registrar
    from ..ledger.enroll import Registrar
    from ..ledger.etcd import EtcdStore
    from ..net import CertificateAuthority, Identity

    ident = Identity(registrar / "registrar.key", registrar / "registrar.crt",
                     registrar / "ca.crt")
    store = EtcdStore([e for e in endpoints.split(",") if e], ident)
    return Registrar(store, CertificateAuthority(ca))


@swarm_app.command("ledger")
def swarm_ledger(
    ca: Annotated[Path, _CA] = Path("ca"),
    dir: Annotated[Path, typer.Option(help="Where the members' data, logs and certificates go "
                                           "(a fresh directory).")] = Path("ledger"),
    members: Annotated[int, typer.Option(help="Members (3 tolerates one failure).")] = 3,
) -> None:
    """Run a local etcd cluster for the swarm's ledger until Ctrl-C.

    For one machine (demos, tests); in production each consortium member runs one member."""
    from ..ledger.cluster import EtcdCluster
    from ..net import CertificateAuthority

    with EtcdCluster(dir, CertificateAuthority(ca), members=members) as cluster:
        console.print(f"ledger: {members} etcd members at {','.join(cluster.endpoints)}; "
                      f"registrar identity in {dir / 'certs'}. Ctrl-C stops it.", soft_wrap=True)
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        try:
            done.wait()
        except KeyboardInterrupt:
            pass


@swarm_app.command("enroll")
def swarm_enroll(
    device: Annotated[str, typer.Argument(help="The device's id.")],
    endpoints: Annotated[str, _ENDPOINTS],
    ca: Annotated[Path, _CA] = Path("ca"),
    registrar: Annotated[Path, _REGISTRAR] = Path("ledger/certs"),
    out: Annotated[Path, typer.Option(help="Where to write the device's files.")] = Path("devices"),
    host: Annotated[list[str] | None, typer.Option(
        help="A host name or IP the device serves its blobs at (repeatable).")] = None,
) -> None:
    """Admit DEVICE to the swarm's ledger.

    Issues its certificate and Ed25519 signing key, creates its etcd user and role (it may
    write under its own prefix only) and records its public key in the ledger's registry."""
    import shutil

    ident = _registrar(ca, endpoints, registrar).enroll(
        device, out, hosts=tuple(host or ("127.0.0.1", "localhost")))
    shutil.copyfile(ca / "crl.pem", out / "crl.pem")  # the blob server's revocation list
    console.print(f"enrolled {device}: {ident.tls.key}, {ident.tls.cert}, {ident.tls.ca}, "
                  f"{ident.signing_key}, {out / 'crl.pem'}; copy them to the device's swarm.identity_dir over a "
                  "secure channel.", soft_wrap=True)


@swarm_app.command("revoke")
def swarm_revoke(
    device: Annotated[str, typer.Argument(help="The device to revoke.")],
    endpoints: Annotated[str, _ENDPOINTS],
    ca: Annotated[Path, _CA] = Path("ca"),
    registrar: Annotated[Path, _REGISTRAR] = Path("ledger/certs"),
    reason: Annotated[str, typer.Option(help="Why (recorded on the ledger).")] = "revoked",
) -> None:
    """Revoke DEVICE: its certificate, etcd user and role.

    The ledger refuses its entries from now on, and peers refuse to serve it blobs."""
    _registrar(ca, endpoints, registrar).revoke(device, reason)
    console.print(f"revoked {device} ({reason}).")


@swarm_app.command("join")
def swarm_join(
    config: Annotated[Path, typer.Argument(help="The job's TOML config (paradigm = \"swarm\").")],
    node_id: Annotated[str, typer.Option("--node-id", help="This device's enrolled id.")],
    data: Annotated[Path, typer.Option(help=".npz with arrays x, y: this peer's examples.")],
    out: Annotated[Path | None, typer.Option(
        help="Where this peer writes metrics.jsonl, model.safetensors and its blobs.")] = None,
    set_: Annotated[list[str] | None, _SET] = None,
    verbose: Annotated[bool, _VERBOSE] = False,
    quiet: Annotated[bool, _QUIET] = False,
) -> None:
    """Run a swarm peer until the job's rounds are merged.

    Each round it trains, publishes to the ledger and merges with the others; a restarted
    peer catches up from the ledger."""
    from ..net.swarm import SwarmNode

    with _logging(verbose, quiet):
        cfg = load_config(config, set_ or [])
        try:
            with SwarmNode(cfg, node_id, data, out=out) as node:
                outcome = node.run()
        except ShoalError as e:
            err_console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(1) from None
    console.print(f"{node_id}: {outcome.rounds} rounds merged; model {outcome.hash[:16]}.")


@swarm_app.command("audit")
def swarm_audit(
    config: Annotated[Path, typer.Argument(help="The job's TOML config.")],
    node_id: Annotated[str, typer.Option("--node-id", help="The enrolled id to read as.")],
    set_: Annotated[list[str] | None, _SET] = None,
) -> None:
    """Check every device's signed chain of the job.

    Signatures, write-once versions, no gaps, prev hashes; exit status 1 when anything was
    rewritten, deleted or forged."""
    from ..ledger.enroll import SwarmIdentity
    from ..ledger.etcd import EtcdStore
    from ..ledger.ledger import Ledger

    cfg = load_config(config, set_ or [])
    ident = SwarmIdentity.load(cfg.swarm.identity_dir, node_id)
    with EtcdStore(cfg.swarm.endpoints, ident.tls) as store:
        problems = Ledger(store).audit(cfg.swarm.job)
    for p in problems:
        err_console.print(escape(p), soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    console.print(f"job {cfg.swarm.job!r}: every chain intact.")
