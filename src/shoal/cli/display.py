"""What the terminal shows: a progress bar while a paradigm runs, a summary table at the end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..experiment import ParadigmResult

__all__ = ["ProgressBar", "cost_line", "summary_table"]


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
    """One row per paradigm: accuracy (ROC AUC for binary tasks), the worst and 10th-percentile
    client under federated evaluation, rounds, examples seen, bytes exchanged, time."""
    auc = any("auc" in r.final for r in results)
    spread = any("fed_eval/accuracy_worst" in r.final for r in results)
    table = Table(title="shoal run summary", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    table.add_column("paradigm", style="bold", no_wrap=True)
    table.add_column("accuracy", justify="right", no_wrap=True, min_width=8)
    if auc:
        table.add_column("AUC", justify="right", no_wrap=True, min_width=6)
    if spread:
        table.add_column("worst", justify="right", no_wrap=True)
        table.add_column("p10", justify="right", no_wrap=True)
        table.caption = ("worst, p10: accuracy of the worst client and the 10th percentile, "
                         "each client testing the model on its own held-out data")
    for col in ("rounds", "examples", "bytes", "time"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        f = r.final
        row = [r.paradigm, f"{f.get('accuracy', float('nan')):.4f}"]
        if auc:
            row.append(f"{f['auc']:.4f}" if "auc" in f else "")
        if spread:
            row += [f"{f[k]:.3f}" if k in f else "" for k in
                    ("fed_eval/accuracy_worst", "fed_eval/accuracy_p10")]
        row += [str(r.rounds), f"{r.examples:,.0f}", _size(r.bytes) if r.bytes else "0",
                f"{r.seconds:.1f} s"]
        table.add_row(*row)
    return table


def cost_line(results: Sequence[ParadigmResult]) -> str | None:
    """'<paradigm> vs centralized: X accuracy points (, Y AUC)' when a paradigm and the
    baseline both ran."""
    base = next((r.final for r in results if r.paradigm == "centralized"), None)
    if base is None or "accuracy" not in base:
        return None
    parts = []
    for r in results:
        if r.paradigm == "centralized" or "accuracy" not in r.final:
            continue
        text = (f"{r.paradigm} vs centralized: "
                f"{100 * (r.final['accuracy'] - base['accuracy']):+.2f} accuracy points")
        if "auc" in r.final and "auc" in base:
            text += f", {r.final['auc'] - base['auc']:+.3f} AUC"
        parts.append(text)
    return "; ".join(parts) or None
