"""What the terminal shows: a progress bar while a paradigm runs, a summary table at the end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..experiment import ParadigmResult

__all__ = ["ProgressBar", "summary_table"]


class ProgressBar:
    """A callback drawing one progress bar per paradigm, with the latest central accuracy."""

    def __init__(self, console: Console, paradigm: str, rounds: int):
        self.console = console
        self.paradigm = paradigm
        self.rounds = rounds
        self._progress: Progress | None = None
        self._task: Any = None

    def on_run_start(self, ctx: Any) -> None:
        """Start drawing (at the resumed round, if any)."""
        self._progress = Progress(
            TextColumn(f"[bold]{self.paradigm:<12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("rounds  {task.fields[status]}"), TimeElapsedColumn(),
            console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(self.paradigm, total=self.rounds,
                                             completed=ctx.round, status="")

    def after_round(self, ctx: Any, report: Any) -> None:
        """Advance by one round and show the newest metrics."""
        assert self._progress is not None
        m = report.metrics
        parts = []
        if "central/accuracy" in m:
            parts.append(f"accuracy {m['central/accuracy']:.4f}")
        if "train/loss" in m:
            parts.append(f"loss {m['train/loss']:.4f}")
        if m.get("round/dropped"):
            parts.append(f"dropped {int(m['round/dropped'])}")
        if report.failed:
            parts.append("[red]round failed[/red]")
        self._progress.update(self._task, completed=report.round, status="  ".join(parts))

    def on_run_end(self, ctx: Any) -> None:
        """Stop drawing."""
        if self._progress is not None:
            self._progress.stop()


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n}"


def summary_table(results: Sequence[ParadigmResult]) -> Table:
    """One row per paradigm: accuracy (and AUC), rounds, examples seen, bytes, time."""
    auc = any("auc" in r.final for r in results)
    fed_eval = any("fed_eval/accuracy_worst" in r.final for r in results)
    table = Table(title="shoal run summary", title_justify="left")
    table.add_column("paradigm", style="bold")
    table.add_column("accuracy", justify="right")
    if auc:
        table.add_column("ROC AUC", justify="right")
    if fed_eval:
        table.add_column("clients: mean / worst / p10", justify="right")
    for col in ("rounds", "examples seen", "bytes exchanged", "time"):
        table.add_column(col, justify="right")
    for r in results:
        row = [r.paradigm, f"{r.final.get('accuracy', float('nan')):.4f}"]
        if auc:
            row.append(f"{r.final['auc']:.4f}" if "auc" in r.final else "")
        if fed_eval:
            f = r.final
            row.append(f"{f['fed_eval/accuracy']:.3f} / {f['fed_eval/accuracy_worst']:.3f} / "
                       f"{f['fed_eval/accuracy_p10']:.3f}" if "fed_eval/accuracy_worst" in f
                       else "")
        row += [str(r.rounds), f"{r.examples:,.0f}", _size(r.bytes) if r.bytes else "0 (pooled)",
                f"{r.seconds:.1f} s"]
        table.add_row(*row)
    return table


def cost_line(results: Sequence[ParadigmResult]) -> str | None:
    """'Federating cost X points of accuracy' when both a paradigm and the baseline ran."""
    by = {r.paradigm: r.final.get("accuracy") for r in results}
    base = by.get("centralized")
    others = [(p, a) for p, a in by.items() if p != "centralized" and a is not None]
    if base is None or not others:
        return None
    return "; ".join(f"{p} vs centralized: {100 * (a - base):+.2f} accuracy points"
                     for p, a in others)
