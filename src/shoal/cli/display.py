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
        shown = next((k for k in _COLUMNS if f"central/{k}" in m), None)
        if shown is not None:
            parts.append(f"{_COLUMNS[shown]} {_fmt(shown, m[f'central/{shown}'])}")
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


_COLUMNS = {"accuracy": "accuracy", "auc": "AUC", "rmse": "RMSE", "mae": "MAE",
            "perplexity": "perplexity"}
# Metrics shown as columns, in this order, when a paradigm reports them (F1, MSE and loss stay in
# summary.json and metrics.jsonl: the table must fit 80 columns).
_SCORES = ("accuracy", "auc", "f1")


def _fmt(metric: str, value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if metric in _SCORES else f"{value:.{digits}g}"


def _spread(results: Sequence[ParadigmResult]) -> tuple[str, str] | None:
    """``(metric, tail key)`` of the federated-evaluation spread the results hold, if any."""
    for r in results:
        for k in r.final:
            if k.startswith("fed_eval/") and k.endswith("_worst"):
                metric = k.removeprefix("fed_eval/").removesuffix("_worst")
                for tail in ("p10", "p90"):
                    if f"fed_eval/{metric}_{tail}" in r.final:
                        return metric, tail
    return None


def summary_table(results: Sequence[ParadigmResult]) -> Table:
    """One row per paradigm: the task's metrics on the central test set (accuracy and ROC AUC
    for classification, RMSE and MAE for regression, perplexity for sequences), the worst client
    and the tail percentile of the primary metric under federated evaluation (for an error the
    highest client and the 90th percentile), rounds, examples seen, bytes exchanged, time; and,
    when a paradigm trained with differential privacy, what it cost: ε at δ, the accountant
    that computed it and what it protects (``summary.json``: ``results[i].privacy``)."""
    spread = _spread(results)
    shown = [k for k in _COLUMNS if any(k in r.final for r in results)]
    if spread and spread[0] not in shown and any(spread[0] in r.final for r in results):
        shown.append(spread[0])  # a primary metric of the user's own
    shown = shown or ["accuracy"]
    table = Table(title="shoal run summary", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    table.add_column("paradigm", style="bold", no_wrap=True)
    for k in shown:
        title = _COLUMNS.get(k, k)
        table.add_column(title, justify="right", no_wrap=True, min_width=max(6, len(title)))
    if spread:
        metric, tail = spread
        table.add_column("worst", justify="right", no_wrap=True)
        table.add_column(tail, justify="right", no_wrap=True)
        name = _COLUMNS.get(metric, metric)
        if tail == "p10":
            table.caption = (f"worst, p10: {name} of the worst client and the 10th percentile, "
                             "each client testing the model on its own held-out data")
        else:
            table.caption = (f"worst, p90: {name} of the worst client (the highest) and the "
                             "90th percentile, each client testing the model on its own "
                             "held-out data")
    for col in ("rounds", "examples", "bytes", "time"):
        table.add_column(col, justify="right", no_wrap=True)
    private = any(r.privacy for r in results)
    if private:
        for col in ("ε", "δ", "accountant"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("protects")
    for r in results:
        f = r.final
        row = [r.paradigm]
        for k in shown:
            row.append(_fmt(k, f[k]) if k in f else ("nan" if k == "accuracy" else ""))
        if spread:
            metric, tail = spread
            row += [_fmt(metric, f[k], 3) if k in f else "" for k in
                    (f"fed_eval/{metric}_worst", f"fed_eval/{metric}_{tail}")]
        row += [str(r.rounds), f"{r.examples:,.0f}", _size(r.bytes) if r.bytes else "0",
                f"{r.seconds:.1f} s"]
        if private:
            row += _privacy_cells(r.privacy)
        table.add_row(*row)
    return table


def _privacy_cells(p: dict[str, Any]) -> list[str]:
    """ε, δ, accountant and what it protects; blank without DP ("no DP" in the last)."""
    if not p:
        return ["", "", "", "no DP"]
    eps = p.get("epsilon")
    return [f"{eps:.3g}" if eps is not None else "", f"{p['delta']:g}",
            str(p["accountant"]).upper(), str(p["protects"])]


def cost_line(results: Sequence[ParadigmResult]) -> str | None:
    """'<paradigm> vs centralized: X accuracy points (, Y AUC)' when a paradigm and the
    baseline both ran; for a regression 'RMSE +D (paradigm's vs baseline's)'."""
    base = next((r.final for r in results if r.paradigm == "centralized"), None)
    if base is None:
        return None
    if "accuracy" not in base:
        error = next((k for k in ("rmse", "mae", "perplexity") if k in base), None)
        if error is None:
            return None
        lines = [f"{r.paradigm} vs centralized: {_COLUMNS[error]} "
                 f"{r.final[error] - base[error]:+.4g} ({r.final[error]:.4g} vs "
                 f"{base[error]:.4g})" for r in results
                 if r.paradigm != "centralized" and error in r.final]
        return "; ".join(lines) or None
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
