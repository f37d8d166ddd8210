"""The ``shoal`` command.

    shoal run [CONFIG.toml] [--set key=value ...] [--out DIR] [--seeds 0,1,2]
    shoal run [CONFIG.toml] --out DIR --overwrite
    shoal run --resume DIR [--set federated.rounds=N]
    shoal config [CONFIG.toml] [--set key=value ...]
    shoal tasks
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..checkpoint import prepare_run_dir
from ..config import Config, load_config
from ..errors import ShoalError
from ..validate_config import load_checked

if TYPE_CHECKING:
    from ..dashboard import Dashboard

__all__ = ["app", "config_command", "main", "run_command", "tasks_command"]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="shoal: train models on data that never leaves its owners.")
console = Console()
err_console = Console(stderr=True)


@app.command("run")
def run_command(
    config: Annotated[Path | None, typer.Argument(
        help="TOML config; none runs the built-in default (digits, FedAvg).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config field: section.field=value (repeatable).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Run directory (default: <out_dir>/<task>-<paradigm>-<time>).")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the interrupted run in this directory (--set federated.rounds=N "
             "extends a finished one).")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Delete the run already in --out and start over (without it, a run refuses a "
             "directory that holds files).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
    seeds: Annotated[str | None, typer.Option(
        help="Run once per seed, e.g. 0,1,2 (each in RUN/seed-N), and report the mean and "
             "spread across seeds (RUN/seeds.json).")] = None,
    dashboard: Annotated[bool, typer.Option(
        help="Serve a live, read-only page of the run on this machine "
             "(http://127.0.0.1:PORT/; docs/dashboard.md).")] = False,
    dashboard_port: Annotated[int, typer.Option(
        help="The dashboard's port (0: any free port).")] = 8050,
) -> None:
    """Run a job in simulation (its paradigm, with the centralized baseline) and summarise it."""
    from ..experiment import run_experiment
    from .display import ProgressBar, cost_line, summary_table

    # force: a dependency (opacus) calls basicConfig at import, which made this one a no-op
    logging.basicConfig(force=True, level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if resume is not None:
        if config is not None or out is not None or overwrite:
            raise ShoalError("--resume continues a run in its own directory with the config it "
                             "started with; drop the CONFIG argument and the --out and "
                             "--overwrite options.")
        prepare_run_dir(resume, resume=True)  # it exists and is a run directory
        cfg = load_config(resume / "config.toml", _resume_overrides(set_ or []))
        run_dir = resume
    else:
        cfg = load_checked(config, set_ or [])  # every problem, before a directory is made
        run_dir = out or _new_run_dir(Path(cfg.out_dir), f"{cfg.task.name}-{cfg.paradigm}")

    if seeds is not None:
        if resume is not None:
            raise ShoalError("--resume continues a run with the seeds it started with; drop "
                             "--seeds.")
        from ..seeds import parse_seeds

        cfg = dataclasses.replace(cfg, seeds=parse_seeds(seeds))

    def callbacks(paradigm: str, rounds: int) -> list[object]:
        return [*([] if quiet else [ProgressBar(console, paradigm, rounds)]),
                *(board.callbacks(paradigm, rounds) if board else [])]

    if resume is None:  # refuses a directory that holds files, unless --overwrite
        prepare_run_dir(run_dir, overwrite=overwrite)
    console.print(f"run directory: [bold]{run_dir}[/bold]")
    board: Dashboard | None = None
    if dashboard:
        from ..dashboard.launch import start_dashboard

        board = start_dashboard(cfg, console.print, port=dashboard_port)
    try:
        if cfg.seeds:
            _run_seeds(cfg, run_dir, resume is not None, quiet, board)
            return
        results = run_experiment(cfg, run_dir, resume=resume is not None, callbacks=callbacks)
    except KeyboardInterrupt:
        err_console.print(f"interrupted; completed rounds are checkpointed. Continue with:\n"
                          f"  shoal run --resume {run_dir}")
        raise typer.Exit(130) from None
    finally:
        if board is not None:
            board.stop()
    console.print(summary_table(results))
    line = cost_line(results)
    if line:
        console.print(line)
    for r in results:
        if r.stopped:
            console.print(escape(f"{r.paradigm} stopped early: {r.stopped}"))


@app.command("config")
def config_command(
    config: Annotated[Path | None, typer.Argument(
        help="TOML config; none shows the built-in default.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config field: section.field=value (repeatable).")] = None,
) -> None:
    """Print the resolved config, every section and field with its value, as it would run (the
    task's defaults filled in); or list every problem of it and exit with status 2."""
    from ..config import to_toml
    from ..data.tasks import load_task
    from ..experiment import resolve_config

    cfg = load_checked(config, set_ or [])
    print(to_toml(resolve_config(cfg, load_task(cfg.task.name, **cfg.task.options))), end="")


@app.command("tasks")
def tasks_command() -> None:
    """List the built-in tasks: kind, metrics (primary first), options, data and
    preprocessing. A task of your own runs with task.name = "package.module:factory"."""
    from rich.padding import Padding
    from rich.text import Text

    from ..data.tasks import task_info, task_names

    for name in task_names():
        info = task_info(name)
        metrics = [f"{info['primary']} (primary)",
                   *(m for m in info["metrics"] if m != info["primary"])]
        opts = ", ".join(f"{k}={v!r}" for k, v in info["options"].items()) or "none"
        console.print(f"[bold]{name}[/bold]  {info['kind']}: {', '.join(metrics)}",
                      highlight=False)
        lines = [f"options: {opts}", *([info["summary"]] if info["summary"] else [])]
        for line in lines:
            console.print(Padding(Text(line), (0, 0, 0, 4), expand=False), highlight=False)
    console.print('Your own task: task.name = "package.module:factory" (see docs/tasks.md, '
                  '"A task of your own").', highlight=False)


def _run_seeds(cfg: Config, run_dir: Path, resume: bool, quiet: bool,
               board: Dashboard | None = None) -> None:
    from ..seeds import run_seeds, seeds_table
    from .display import ProgressBar

    def callbacks(seed: int, paradigm: str, rounds: int) -> list[object]:
        return [*([] if quiet else [ProgressBar(console, f"{paradigm} s{seed}", rounds)]),
                *(board.callbacks(paradigm, rounds, f"{paradigm} (seed {seed})") if board
                  else [])]

    try:
        summary = run_seeds(cfg, run_dir, resume=resume, callbacks=callbacks)
    except KeyboardInterrupt:
        err_console.print(f"interrupted; completed rounds are checkpointed. Continue with:\n"
                          f"  shoal run --resume {run_dir}")
        raise typer.Exit(130) from None
    console.print(seeds_table(summary))
    console.print(f"per-seed runs in {run_dir}/seed-N; spread in {run_dir / 'seeds.json'}")
    for name, p in summary["paradigms"].items():
        for seed, why in p["stopped"].items():
            console.print(escape(f"{name} (seed {seed}) stopped early: {why}"))


def _resume_overrides(overrides: list[str]) -> list[str]:
    """The ``--set`` options of ``--resume``: only the fields a resumed run may change."""
    from ..checkpoint import RESUMABLE

    refused = [o for o in overrides if o.partition("=")[0].strip() not in RESUMABLE]
    if refused:
        raise ShoalError(
            f"--resume: --set {', '.join(refused)}: a resumed run keeps the config it started "
            f"with; only {', '.join(RESUMABLE)} may change (e.g. --set federated.rounds=50 "
            "extends a finished run). Drop the other --set options, or start a new run with "
            "them.")
    return overrides


def _new_run_dir(parent: Path, stem: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = parent / f"{stem}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = parent / f"{stem}-{stamp}-{n}"
    return path


def main() -> None:
    """Entry point: run the app; a ShoalError prints its message and exits with status 2."""
    try:
        app()
    except ShoalError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}")
        sys.exit(2)


from . import audit as _audit  # noqa: E402,F401  (registers shoal audit)
from . import compare as _compare  # noqa: E402,F401  (registers shoal compare)
from . import dp as _dp  # noqa: E402,F401  (registers data-parallel, the torchrun entry)
from . import net as _net  # noqa: E402,F401  (registers serve, join, split and ca)
from . import report as _report  # noqa: E402,F401  (registers shoal report)
from . import swarm as _swarm  # noqa: E402,F401  (registers shoal swarm ...)
