"""Deployment commands: ``shoal serve``, ``shoal join``, ``shoal split`` and ``shoal ca``.

    shoal ca init [--dir ca] [--host NAME ...]      a CA and the coordinator's certificate
    shoal ca enroll NODE_ID [--dir ca] [--out DIR]  a node's key and certificate
    shoal ca revoke NODE_ID [--dir ca]              add the node to the revocation list
    shoal serve CONFIG [--out DIR] | --resume DIR   run the coordinator
    shoal join CONFIG --node-id ID --data FILE.npz  run a client
    shoal split CONFIG --out DIR                    one data file per simulated client
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..config import load_config
from ..errors import ShoalError
from . import _new_run_dir, app, console, err_console

__all__ = ["ca_app", "ca_enroll", "ca_init", "ca_revoke", "join_command", "serve_command",
           "split_command"]

ca_app = typer.Typer(no_args_is_help=True, help="The project's certificate authority.")
app.add_typer(ca_app, name="ca")

_SET = typer.Option("--set", help="Override a config field: section.field=value (repeatable).")
_INSECURE = typer.Option("--insecure", help="Plain text, no identities: local experiments only.")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _net_overrides(set_: list[str] | None, address: str | None, insecure: bool) -> list[str]:
    out = list(set_ or [])
    if address:
        out.append(f'network.address="{address}"')
    if insecure:
        out.append("network.insecure=true")
    return out


@ca_app.command("init")
def ca_init(
    dir: Annotated[Path, typer.Option(help="Directory of the new CA.")] = Path("ca"),
    host: Annotated[list[str] | None, typer.Option(
        help="Host name or IP address clients use to reach the coordinator (repeatable).")] = None,
) -> None:
    """Create a CA and the coordinator's certificate (for --host names)."""
    from ..net import CertificateAuthority

    hosts = tuple(host or ("localhost", "127.0.0.1"))
    CertificateAuthority.init(dir, hosts=hosts)
    console.print(f"CA created in {dir} (coordinator certificate for {', '.join(hosts)}); "
                  f"keep {dir / 'ca.key'} secret.")


@ca_app.command("enroll")
def ca_enroll(
    node_id: Annotated[str, typer.Argument(help="The node's id (its certificate's name).")],
    dir: Annotated[Path, typer.Option(help="The CA directory.")] = Path("ca"),
    out: Annotated[Path | None, typer.Option(
        help="Where to write NODE_ID.key, NODE_ID.crt and ca.crt (default: DIR/nodes).")] = None,
) -> None:
    """Issue a private key and certificate binding NODE_ID to this project."""
    from ..net import CertificateAuthority

    ident = CertificateAuthority(dir).enroll(node_id, out or dir / "nodes")
    console.print(f"enrolled {node_id}: {ident.key}, {ident.cert}, {ident.ca}; copy them to the "
                  "node's tls_dir over a secure channel.")


@ca_app.command("revoke")
def ca_revoke(
    node_id: Annotated[str, typer.Argument(help="The node to revoke.")],
    dir: Annotated[Path, typer.Option(help="The CA directory.")] = Path("ca"),
) -> None:
    """Revoke every certificate of NODE_ID (the coordinator re-reads the list)."""
    from ..net import CertificateAuthority

    serials = CertificateAuthority(dir).revoke(node_id)
    console.print(f"revoked {len(serials)} certificate(s) of {node_id}; {dir / 'crl.pem'} "
                  "updated (the coordinator must read this file: its network.tls_dir).")


@app.command("serve")
def serve_command(
    config: Annotated[Path | None, typer.Argument(help="TOML config of the job.")] = None,
    set_: Annotated[list[str] | None, _SET] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory.")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the interrupted run in this directory.")] = None,
    address: Annotated[str | None, typer.Option(help="host:port to listen on.")] = None,
    insecure: Annotated[bool, _INSECURE] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Run the coordinator of a federated job; clients connect with `shoal join`."""
    from ..net.deploy import serve
    from .display import summary_table

    _logging(verbose)
    overrides = _net_overrides(set_, address, insecure)
    if resume is not None:
        if config is not None or out is not None:
            raise ShoalError("--resume continues a run in its own directory with the config it "
                             "started with; drop the CONFIG argument and --out.")
        cfg = load_config(resume / "config.toml", overrides)
        run_dir = resume
    else:
        cfg = load_config(config, overrides)
        run_dir = out or _new_run_dir(Path(cfg.out_dir), f"{cfg.task.name}-served")
    console.print(f"run directory: [bold]{run_dir}[/bold]")
    try:
        results = serve(cfg, run_dir, resume=resume is not None)
    except KeyboardInterrupt:
        err_console.print(f"interrupted; completed rounds are checkpointed. Continue with:\n"
                          f"  shoal serve --resume {run_dir}")
        raise typer.Exit(130) from None
    console.print(summary_table(results))


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Run a client node: connect to the coordinator and train on this node's data."""
    from ..net.deploy import join

    _logging(verbose)
    cfg = load_config(config, _net_overrides(set_, address, insecure))
    reason = join(cfg, node_id, data, state=state)
    console.print(escape(f"{node_id}: the coordinator ended the session ({reason})."))


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
