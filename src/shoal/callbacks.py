"""Callbacks for :func:`shoal.run`: evaluation (both ways the seeds describe), metrics logs
and early stopping. Checkpointing lives in :mod:`shoal.checkpoint`.

* ``CentralEvaluation`` — the coordinator holds a test set and evaluates the global model.
* ``FederatedEvaluation`` — each client evaluates the global model on its own held-out data;
  the weighted mean is reported with the distribution across clients of the primary metric
  (worst client, and the figure only a tenth of the clients do worse than), since an
  under-represented client can get a much worse model than the mean.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .algorithm import RoundReport
from .errors import CheckpointError, ConfigError
from .message import COORDINATOR, Message
from .metrics import distribution_summary, pooled_average, tail_key
from .metrics import lower_is_better as _lower_is_better
from .run import Callback, RunContext
from .tree import Params

__all__ = ["CentralEvaluation", "EarlyStopping", "FederatedEvaluation", "MetricsLog",
           "read_metrics"]

log = logging.getLogger(__name__)


def _every(name: str, every: int) -> int:
    if every < 1:
        raise ConfigError(f"{name}: every must be >= 1 round (got {every}).")
    return every


class CentralEvaluation(Callback):
    """Evaluate the global params with ``evaluate_fn(params) -> metrics`` every ``every``
    rounds and after the last; metrics are reported as ``central/<name>``."""

    def __init__(self, evaluate_fn: Callable[[Params], dict[str, float]], every: int = 1,
                 prefix: str = "central/"):
        self.evaluate_fn = evaluate_fn
        self.every = _every("CentralEvaluation", every)
        self.prefix = prefix

    def after_round(self, ctx: RunContext, report: RoundReport) -> None:
        """Evaluate on multiples of ``every``."""
        if report.round % self.every == 0:
            self._evaluate(ctx, report.metrics)

    def on_run_end(self, ctx: RunContext) -> None:
        """Make sure the final model has been evaluated."""
        if ctx.history and f"{self.prefix}accuracy" not in ctx.history[-1] \
                and f"{self.prefix}loss" not in ctx.history[-1]:
            self._evaluate(ctx, ctx.history[-1])

    def _evaluate(self, ctx: RunContext, into: dict[str, Any]) -> None:
        for k, v in self.evaluate_fn(ctx.params()).items():
            into[f"{self.prefix}{k}"] = v


class FederatedEvaluation(Callback):
    """Ask clients to evaluate the global params on their held-out data (``"evaluate"``).

    Reports every metric as ``fed_eval/<name>``, the mean over clients weighted by examples
    (RMSE and perplexity recomputed from the pooled MSE and loss, see
    :func:`~shoal.metrics.pooled_average`), ``fed_eval/clients``, and the spread of ``metric``
    (the task's primary) across clients: ``fed_eval/<metric>_worst`` and the tail figure a
    tenth of the clients do worse than. For a score (accuracy, higher is better) these are the
    lowest client and ``fed_eval/<metric>_p10``, the 10th percentile; for an error
    (``lower_is_better``, e.g. RMSE) the highest client and ``fed_eval/<metric>_p90``, the 90th
    percentile. ``lower_is_better=None`` infers the direction from the name (loss, rmse, mae,
    mse, perplexity are errors). ``clients`` limits the evaluation to a fixed list (default:
    every reachable node).
    """

    def __init__(self, every: int = 1, *, metric: str = "accuracy", timeout: float | None = None,
                 clients: list[str] | None = None, lower_is_better: bool | None = None):
        self.every = _every("FederatedEvaluation", every)
        self.metric = metric
        self.lower_is_better = (_lower_is_better(metric) if lower_is_better is None
                                else lower_is_better)
        self.timeout = timeout
        self.clients = clients
        self.last_per_client: dict[str, dict[str, float]] = {}

    def after_round(self, ctx: RunContext, report: RoundReport) -> None:
        """Evaluate on multiples of ``every``."""
        if report.round % self.every == 0:
            report.metrics.update(self.evaluate(ctx))

    def evaluate(self, ctx: RunContext) -> dict[str, float]:
        """Run one federated evaluation of the current params now; return its metrics."""
        targets = self.clients if self.clients is not None else ctx.transport.nodes()
        params = ctx.params()
        requests = [Message("evaluate", COORDINATOR, c, ctx.round, params) for c in targets]
        replies = ctx.transport.request(requests, self.timeout)
        results = {r.src: r.metrics for r in replies
                   if r.error is None and r.metrics.get("examples", 0) > 0}
        self.last_per_client = results
        if not results:
            return {"fed_eval/clients": 0.0}
        out = {f"fed_eval/{k}": v for k, v in pooled_average(list(results.values())).items()}
        out["fed_eval/clients"] = float(len(results))
        spread = distribution_summary([m.get(self.metric, math.nan) for m in results.values()],
                                      lower_is_better=self.lower_is_better)
        tail = "p90" if self.lower_is_better else "p10"
        if spread:
            out[f"fed_eval/{self.metric}_worst"] = spread["worst"]
            out[f"fed_eval/{tail_key(self.metric, self.lower_is_better)}"] = spread[tail]
        return out


class MetricsLog(Callback):
    """Append each round's metrics as one JSON line to ``path`` (``metrics.jsonl``).

    On a resumed run, lines for rounds after the resumed-from round are dropped first, so the
    file never holds a round twice; rounds the checkpoint's history has but the file lacks (a
    torn last line, dropped with a warning) are written back from the history.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_run_start(self, ctx: RunContext) -> None:
        """Truncate the log to the rounds already completed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("round", 0) <= ctx.round]
        have = {r.get("round") for r in kept}
        kept += [dict(h) for h in ctx.history
                 if h.get("round", 0) <= ctx.round and h.get("round") not in have]
        kept.sort(key=lambda r: r.get("round", 0))
        with self.path.open("w") as f:
            for rec in kept:
                f.write(json.dumps(rec) + "\n")

    def after_round(self, ctx: RunContext, report: RoundReport) -> None:
        """Write this round's line."""
        rec: dict[str, Any] = dict(report.metrics)
        if report.dropped:
            rec["dropped"] = report.dropped
        if report.failed:
            rec["failed"] = report.failed
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (empty if it does not exist).

    A torn last line (a crash mid-write) is dropped with a warning; a line that is not JSON
    before the last raises :class:`~shoal.errors.CheckpointError`."""
    p = Path(path)
    if not p.exists():
        return []
    lines = [(n, line) for n, line in enumerate(p.read_text().splitlines(), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except ValueError as e:
            if i == len(lines) - 1:
                log.warning("%s: line %d is torn (cut off mid-write, as by a crash) and is "
                            "dropped: %.80r", p, n, line)
                break
            raise CheckpointError(
                f"{p}: line {n} is not a JSON object of one round's metrics ({e}), and it is not "
                "the last line, so the file was edited or damaged; restore it or delete the "
                "broken lines (each line is one round).") from e
        records.append(rec)
    return records


class EarlyStopping(Callback):
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` evaluations."""

    def __init__(self, metric: str = "central/accuracy", patience: int = 5,
                 mode: str = "max", min_delta: float = 0.0):
        if mode not in ("max", "min"):
            raise ConfigError(f"EarlyStopping: mode must be 'max' or 'min' (got {mode!r}).")
        self.metric, self.patience, self.mode, self.min_delta = metric, patience, mode, min_delta
        self.best: float | None = None
        self.waited = 0

    def after_round(self, ctx: RunContext, report: RoundReport) -> str | None:
        """Track the metric; return a reason once patience runs out."""
        value = report.metrics.get(self.metric)
        if value is None:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.waited = value, 0
            return None
        self.waited += 1
        if self.waited >= self.patience:
            return f"early stopping: {self.metric} did not improve for {self.patience} evaluations"
        return None
