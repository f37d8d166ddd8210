"""``shoal compare CONFIG [--only a,b] [--out DIR] [--set k=v ...]`` and ``shoal compare
--resume DIR``: the task run as every paradigm and privacy variant (:mod:`shoal.compare`),
one table, ``DIR/compare.json`` and, when ``shoal.report`` can write one, ``DIR/report.html``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ShoalError
from . import _new_run_dir, app, console, err_console

__all__ = ["compare_command", "compare_table"]


def _num(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _bytes(value: Any) -> str:
    if value is None:
        return "—"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.3g} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1000
    return str(value)  # unreachable


def compare_table(variants: Sequence[Any], metric: str = "accuracy",
                  lower_is_better: bool = False) -> Table:
    """One row per variant (:class:`~shoal.compare.VariantResult`s or their JSON entries):
    status, the primary ``metric`` (global, worst client, 10th percentile, or 90th for an
    error metric), ε, bytes per participant and in total, wall time, compute per
    participant, rounds and examples seen."""
    table = Table(title="shoal compare", title_justify="left")
    tail = "p90" if lower_is_better else "p10"
    for col in ("variant", "status", metric, "worst client", tail, "ε", "bytes/part.",
                "bytes total", "wall s", "compute s/part.", "rounds", "examples"):
        table.add_column(escape(col),
                         justify="left" if col in ("variant", "status") else "right")
    for v in variants:
        d = v if isinstance(v, dict) else v.to_json()
        f = d.get("figures") or {}
        status = d["status"] + (" (early stop)" if f.get("stopped") else "")
        table.add_row(
            escape(d["name"]), status, _num(f.get("accuracy"), ".4f"),
            _num(f.get("accuracy_worst_client"), ".4f"), _num(f.get("accuracy_p10"), ".4f"),
            _num(f.get("epsilon"), ".3g"), _bytes(f.get("bytes_per_participant")),
            _bytes(f.get("bytes_total")), _num(f.get("seconds"), ".1f"),
            _num(f.get("compute_s_per_participant"), ".2f"), _num(f.get("rounds"), "d"),
            _num(f.get("examples"), ".0f"))
    return table


@app.command("compare")
def compare_command(
    config: Annotated[Path | None, typer.Argument(
        help="TOML config of the task, model and budget; none runs the built-in default.")]
    = None,
    only: Annotated[str, typer.Option(
        help="Comma-separated variants to run (default: all): centralized, data_parallel, "
             "federated, federated-dp, federated-secagg, federated-dp-secagg, federated-ddp, "
             "split, split-ushaped, splitfed, swarm.")] = "",
    out: Annotated[Path | None, typer.Option(
        help="Comparison directory (default: <out_dir>/<task>-compare-<time>); one run "
             "directory per variant inside.")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the interrupted comparison in this directory.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config field: section.field=value (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Run one task as every paradigm and privacy variant, each to convergence (early stopping
    on a held-out validation set) at an equal number of examples seen; print one table and
    write DIR/compare.json (and DIR/report.html)."""
    from ..compare import compare, write_compare_report
    from ..validate_config import load_checked
    from .display import ProgressBar

    logging.basicConfig(force=True, level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    names = [n.strip() for n in only.split(",") if n.strip()]
    if resume is not None:
        if config is not None or out is not None or set_:
            raise ShoalError("--resume continues a comparison in its own directory with the "
                             "config it started with; drop the CONFIG argument and the --out "
                             "and --set options.")
        cfg, out_dir = None, resume
    else:
        cfg = load_checked(config, set_ or [])
        out_dir = out or _new_run_dir(Path(cfg.out_dir), f"{cfg.task.name}-compare")

    def callbacks(variant: str, paradigm: str, rounds: int) -> list[ProgressBar]:
        return [] if quiet else [ProgressBar(console, variant, rounds)]

    console.print(f"comparison directory: [bold]{escape(str(out_dir))}[/bold]")
    try:
        results = compare(cfg, out_dir, only=names or None, resume=resume is not None,
                          callbacks=callbacks)
    except KeyboardInterrupt:
        err_console.print(f"interrupted; finished variants and completed rounds are kept. "
                          f"Continue with:\n  shoal compare --resume {out_dir}")
        raise typer.Exit(130) from None
    # piped or captured, rich assumes 80 columns and would fold every figure; a log gets it whole
    from ..compare import compared_metric

    try:  # the figures are in the task's primary metric: the column says which
        metric, lower = compared_metric(out_dir)
    except ShoalError:
        metric, lower = "primary metric", False
    table = compare_table(results, metric, lower)
    (console if console.is_terminal else Console(width=170)).print(table)
    for r in results:
        if r.reason:
            console.print(escape(f"{r.name} {r.status}: {r.reason}"), soft_wrap=True)
        elif r.figures.get("stopped"):
            console.print(escape(f"{r.name} stopped early: {r.figures['stopped']}"),
                          soft_wrap=True)
    console.print(f"written to {escape(str(Path(out_dir) / 'compare.json'))}")
    try:
        report = write_compare_report(out_dir)
    except Exception as e:  # noqa: BLE001  (the comparison itself is complete and kept)
        err_console.print(escape(f"report: could not be written: {type(e).__name__}: {e}"))
        raise typer.Exit(1) from None
    console.print(f"report: {escape(str(report))}")
