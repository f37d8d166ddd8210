"""Deployment commands: ``shoal serve``, ``shoal join``, ``shoal split`` and ``shoal ca``.

    shoal ca init [--dir ca] [--host NAME ...]      a CA and the coordinator's certificate
    shoal ca enroll NODE_ID [--dir ca] [--out DIR]  a node's key and certificate
    shoal ca enroll NAME --viewer                   a dashboard viewer's (it cannot join training)
    shoal ca revoke NODE_ID [--dir ca]              add the node to the revocation list
    shoal serve CONFIG [--out DIR] | --resume DIR   run the coordinator
    shoal join CONFIG --node-id ID --data FILE.npz  run a client
    shoal split CONFIG --out DIR                    one data file per simulated client

``serve`` and ``join`` log to stderr: warnings and connection events by default, everything of
shoal's with ``-v``, errors only with ``-q``. ``serve`` shows its progress (a live bar on a
terminal, one line per round elsewhere; none with ``-q``) and handles SIGTERM like Ctrl-C:
the clients are told to wait, and ``shoal serve --resume DIR`` continues (exit status 130, or
143 for SIGTERM). ``join`` explains every failed connection attempt in one line and exits with
status 1 when the coordinator refuses it or stays out of reach for ``network.patience_s``.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from ..config import load_config
from ..errors import ShoalError, TransportError
from . import _new_run_dir, app, console, err_console

__all__ = ["ServeProgress", "ca_app", "ca_enroll", "ca_init", "ca_revoke", "join_command",
           "serve_command", "split_command"]

ca_app = typer.Typer(no_args_is_help=True, help="The project's certificate authority.")
app.add_typer(ca_app, name="ca")

_SET = typer.Option("--set", help="Override a config field: section.field=value (repeatable).")
_INSECURE = typer.Option("--insecure", help="Plain text, no identities: local experiments only.")
_VERBOSE = typer.Option("--verbose", "-v", help="Log more: every retry, every client event.")
_QUIET = typer.Option("--quiet", "-q", help="Log errors only; no progress.")


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is logged (a live progress bar redirects
    it to print above the bar; a test runner captures it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@contextmanager
def _logging(verbose: bool, quiet: bool = False) -> Iterator[None]:
    """Log to stderr while the command runs, then restore the logging setup.

    Replaces the root logger's handlers: a dependency (opacus) calls ``logging.basicConfig`` at
    import, which made a plain ``basicConfig`` here a no-op and ``-v`` silent. Levels: ``-q``
    errors only; by default warnings, and shoal.net's INFO (connections, waiting for clients);
    ``-v`` INFO of everything and DEBUG of shoal (every retry)."""
    root, shoal, net = (logging.getLogger(n) for n in ("", "shoal", "shoal.net"))
    saved = root.handlers[:], root.level, shoal.level, net.level
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root.handlers = [handler]
    if quiet:
        levels = logging.ERROR, logging.NOTSET, logging.NOTSET
    elif verbose:
        levels = logging.INFO, logging.DEBUG, logging.NOTSET
    else:
        levels = logging.WARNING, logging.NOTSET, logging.INFO
    for logger, level in zip((root, shoal, net), levels, strict=True):
        logger.setLevel(level)
    try:
        yield
    finally:
        root.handlers = saved[0]
        for logger, level in zip((root, shoal, net), saved[1:], strict=True):
            logger.setLevel(level)


@contextmanager
def _sigterm_interrupts(received: list[int]) -> Iterator[None]:
    """While the command runs, SIGTERM (a service manager's stop, ``kill``) raises
    KeyboardInterrupt like Ctrl-C, and its number is appended to ``received``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ClientsColumn(ProgressColumn):
    """The number of clients connected to the coordinator now (read at every refresh)."""

    def __init__(self, transport: Any):
        super().__init__()
        self.transport = transport

    def render(self, task: Task) -> Text:
        """``N clients``."""
        return Text(f"{len(self.transport.nodes())} clients", style="cyan")


class ServeProgress:
    """A ``shoal serve`` callback showing the run's progress: on a terminal a live bar
    (rounds done/total, clients connected now, the latest accuracy and loss); elsewhere (a log
    file, a service manager) one line per round with the same numbers."""

    def __init__(self, console: Console, transport: Any, paradigm: str, rounds: int):
        self.console = console
        self.transport = transport
        self.paradigm = paradigm
        self.rounds = rounds
        self.live = console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None

    def on_run_start(self, ctx: Any) -> None:
        """Start the bar (at the resumed round, if any), or say where the run starts."""
        if not self.live:
            self.console.print(f"{self.paradigm}: {ctx.round}/{self.rounds} rounds done, "
                               f"{len(self.transport.nodes())} clients connected", soft_wrap=True)
            return
        self._progress = Progress(
            TextColumn(f"[bold]{self.paradigm:<12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("rounds"), _ClientsColumn(self.transport),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
            console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(self.paradigm, total=self.rounds,
                                             completed=ctx.round, status="")

    def before_round(self, ctx: Any, round: int) -> None:
        """Show that ``round`` runs (the clients it needs are connected by now)."""
        if self._progress is not None:
            self._progress.update(self._task, status=f"round {round} running")

    def after_round(self, ctx: Any, report: Any) -> None:
        """Advance by one round and show its metrics."""
        m = report.metrics
        parts = []
        if "round/replied" in m and "round/sampled" in m:
            parts.append(f"{int(m['round/replied'])}/{int(m['round/sampled'])} replied")
        if "central/accuracy" in m:
            parts.append(f"accuracy {m['central/accuracy']:.4f}")
        if "train/loss" in m:
            parts.append(f"loss {m['train/loss']:.4f}")
        if report.failed:
            parts.append(f"failed: {report.failed}")
        status = ", ".join(parts)
        if self._progress is not None:
            self._progress.update(self._task, completed=report.round, status=status)
        else:
            self.console.print(escape(f"round {report.round}/{self.rounds}: "
                                      f"{len(self.transport.nodes())} clients connected, "
                                      f"{status}"), soft_wrap=True)

    def on_run_end(self, ctx: Any) -> None:
        """Stop the bar."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _net_overrides(set_: list[str] | None, address: str | None, insecure: bool) -> list[str]:
    out = list(set_ or [])
    if address:
        out.append(f'network.address="{address}"')
    if insecure:
        out.append("network.insecure=true")
    return out


_CA_PASSPHRASE = typer.Option(
    help="A file holding the passphrase of ca.key (init: encrypt it with this passphrase).")


def _passphrase(path: Path | None, option: str = "--passphrase-file") -> bytes | None:
    from ..net.ca import read_passphrase

    return None if path is None else read_passphrase(path, option)


@ca_app.command("init")
def ca_init(
    dir: Annotated[Path, typer.Option(help="Directory of the new CA.")] = Path("ca"),
    host: Annotated[list[str] | None, typer.Option(
        help="Host name or IP address clients use to reach the coordinator (repeatable).")] = None,
    passphrase_file: Annotated[Path | None, _CA_PASSPHRASE] = None,
) -> None:
    """Create a CA and the coordinator's certificate (for --host names)."""
    from ..net import CertificateAuthority

    hosts = tuple(host or ("localhost", "127.0.0.1"))
    CertificateAuthority.init(dir, hosts=hosts, passphrase=_passphrase(passphrase_file))
    console.print(f"CA created in {dir} (coordinator certificate for {', '.join(hosts)}). "
                  f"Copy coordinator.key, coordinator.crt, ca.crt and crl.pem to the "
                  f"coordinator's network.tls_dir; {dir / 'ca.key'} stays on this machine, "
                  "secret.")


@ca_app.command("enroll")
def ca_enroll(
    node_id: Annotated[str, typer.Argument(help="The node's id (its certificate's name).")],
    dir: Annotated[Path, typer.Option(help="The CA directory.")] = Path("ca"),
    out: Annotated[Path | None, typer.Option(
        help="Where to write NODE_ID.key, NODE_ID.crt and ca.crt (default: DIR/nodes).")] = None,
    passphrase_file: Annotated[Path | None, _CA_PASSPHRASE] = None,
    key_passphrase_file: Annotated[Path | None, typer.Option(
        help="A file holding a passphrase to encrypt the node's key with (the node then sets "
             "network.key_passphrase_file to its own copy).")] = None,
    viewer: Annotated[bool, typer.Option(
        "--viewer", help="Issue a dashboard viewer's certificate: it opens `shoal serve "
                         "--dashboard` (a client's certificate does not) and cannot join "
                         "training.")] = False,
) -> None:
    """Issue a private key and certificate binding NODE_ID to this project (a training
    client's, or with --viewer a dashboard viewer's)."""
    from ..net import CertificateAuthority

    ident = CertificateAuthority(dir, _passphrase(passphrase_file)).enroll(
        node_id, out or dir / "nodes", viewer=viewer,
        passphrase=_passphrase(key_passphrase_file, "--key-passphrase-file"))
    if viewer:
        console.print(f"enrolled {node_id} as a dashboard viewer: {ident.key}, {ident.cert}, "
                      f"{ident.ca}; give them to the viewer over a secure channel (they open "
                      "the dashboard of `shoal serve --dashboard`; they cannot join training).")
    else:
        console.print(f"enrolled {node_id}: {ident.key}, {ident.cert}, {ident.ca}; copy them to "
                      "the node's tls_dir over a secure channel.")


@ca_app.command("revoke")
def ca_revoke(
    node_id: Annotated[str, typer.Argument(help="The node to revoke.")],
    dir: Annotated[Path, typer.Option(help="The CA directory.")] = Path("ca"),
    passphrase_file: Annotated[Path | None, _CA_PASSPHRASE] = None,
) -> None:
    """Revoke every certificate of NODE_ID (the coordinator re-reads the list)."""
    from ..net import CertificateAuthority

    serials = CertificateAuthority(dir, _passphrase(passphrase_file)).revoke(node_id)
    console.print(f"revoked {len(serials)} certificate(s) of {node_id}; {dir / 'crl.pem'} "
                  "updated. Copy it to the coordinator's network.tls_dir atomically: under a "
                  "temporary name, then `mv` it over crl.pem.")


@app.command("serve")
def serve_command(
    config: Annotated[Path | None, typer.Argument(help="TOML config of the job.")] = None,
    set_: Annotated[list[str] | None, _SET] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory.")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the interrupted run in this directory.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Empty the run directory --out first (a new run refuses one holding files).")] = False,
    address: Annotated[str | None, typer.Option(help="host:port to listen on.")] = None,
    insecure: Annotated[bool, _INSECURE] = False,
    verbose: Annotated[bool, _VERBOSE] = False,
    quiet: Annotated[bool, _QUIET] = False,
    dashboard: Annotated[bool, typer.Option(
        help="Serve a live, read-only page of the run over mutual TLS with the coordinator's "
             "certificate, to viewers with a certificate from the project's CA "
             "(docs/dashboard.md).")] = False,
    dashboard_port: Annotated[int, typer.Option(
        help="The dashboard's port (0: any free port).")] = 8050,
    dashboard_host: Annotated[str, typer.Option(
        help="The address the dashboard listens on (with --insecure: loopback only).")
    ] = "127.0.0.1",
) -> None:
    """Run the coordinator of a federated job; clients connect with `shoal join`.

    Ctrl-C or SIGTERM stops it before the run is over: the clients are told to wait, and
    `shoal serve --resume DIR` continues from the last completed round."""
    with _logging(verbose, quiet):
        _serve(config, set_, out, resume, address, insecure, quiet, overwrite,
               dashboard=(dashboard_host, dashboard_port) if dashboard else None)


def _serve(config: Path | None, set_: list[str] | None, out: Path | None, resume: Path | None,
           address: str | None, insecure: bool, quiet: bool, overwrite: bool = False,
           dashboard: tuple[str, int] | None = None) -> None:
    from ..net.deploy import coordinator_config, coordinator_transport, serve
    from .display import summary_table

    overrides = _net_overrides(set_, address, insecure)
    if resume is not None:
        if config is not None or out is not None:
            raise ShoalError("--resume continues a run in its own directory with the config it "
                             "started with; drop the CONFIG argument and --out.")
        from ..checkpoint import prepare_run_dir

        run_dir = prepare_run_dir(resume, resume=True)  # says so when it is no run directory
        cfg = load_config(resume / "config.toml", overrides)
    else:
        cfg = load_config(config, overrides)
        run_dir = out or _new_run_dir(Path(cfg.out_dir), f"{cfg.task.name}-served")
    console.print(f"run directory: [bold]{run_dir}[/bold]")
    received: list[int] = []
    board = None
    with _sigterm_interrupts(received):
        try:
            if dashboard is not None:
                from ..dashboard.launch import start_dashboard

                board = start_dashboard(coordinator_config(cfg), console.print,
                                        host=dashboard[0], port=dashboard[1], deployment=True)
            transport = coordinator_transport(coordinator_config(cfg))

            def progress(paradigm: str, rounds: int) -> list[object]:
                return [*([] if quiet else [ServeProgress(console, transport, paradigm, rounds)]),
                        *(board.callbacks(paradigm, rounds) if board else [])]

            results = serve(cfg, run_dir, resume=resume is not None, overwrite=overwrite,
                            transport=transport,
                            callbacks=progress)
        except KeyboardInterrupt:
            how = "terminated (SIGTERM)" if received else "interrupted"
            err_console.print(f"{how}; completed rounds are checkpointed and the clients wait "
                              f"for the coordinator. Continue with:\n"
                              f"  shoal serve --resume {run_dir}", soft_wrap=True)
            raise typer.Exit(128 + (received[0] if received else signal.SIGINT)) from None
        finally:
            if board is not None:
                board.stop()
    console.print(summary_table(results))
    for r in results:
        if r.stopped:
            console.print(escape(f"{r.paradigm} stopped early: {r.stopped}"))


@app.command("join")
def join_command(
    config: Annotated[Path, typer.Argument(help="The job's TOML config (as the coordinator's).")],
    node_id: Annotated[str, typer.Option("--node-id", help="This node's enrolled id.")],
    data: Annotated[Path, typer.Option(
        help=".npz with arrays x, y (optional x_eval, y_eval): this node's examples.")],
    set_: Annotated[list[str] | None, _SET] = None,
    address: Annotated[str | None, typer.Option(help="The coordinator's host:port.")] = None,
    insecure: Annotated[bool, _INSECURE] = False,
    state: Annotated[Path | None, typer.Option(
        help="File where this node keeps its algorithm state between rounds (e.g. SCAFFOLD's "
             "control variate), so a restarted client continues with it.")] = None,
    verbose: Annotated[bool, _VERBOSE] = False,
    quiet: Annotated[bool, _QUIET] = False,
) -> None:
    """Run a client node: connect to the coordinator and train on this node's data.

    Each failed connection attempt is explained in one line; the client retries with backoff
    and exits with status 1 after network.patience_s seconds without a connection, or at once
    when the coordinator refuses it."""
    from ..net.deploy import join

    with _logging(verbose, quiet):
        cfg = load_config(config, _net_overrides(set_, address, insecure))
        received: list[int] = []
        with _sigterm_interrupts(received):
            try:
                reason = join(cfg, node_id, data, state=state)
            except TransportError as e:
                err_console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                err_console.print(f"{node_id}: stopped.")
                raise typer.Exit(128 + (received[0] if received else signal.SIGINT)) from None
    console.print(escape(f"{node_id}: the coordinator ended the session ({reason})."),
                  soft_wrap=True)


@app.command("split")
def split_command(
    config: Annotated[Path | None, typer.Argument(help="TOML config of the job.")] = None,
    out: Annotated[Path, typer.Option(help="Directory for CLIENT_ID.npz files.")] = Path("data"),
    set_: Annotated[list[str] | None, _SET] = None,
) -> None:
    """Write one data file per client of the config's simulated federation (for `join`)."""
    from ..data.tasks import load_task
    from ..experiment import make_dataset, resolve_config
    from ..net.clientdata import split_federation

    cfg = load_config(config, set_ or [])
    task = load_task(cfg.task.name, **cfg.task.options)
    paths = split_federation(make_dataset(resolve_config(cfg, task), task), out)
    console.print(f"wrote {len(paths)} client data files to {out}")
