"""A validation set held by the coordinator, and early stopping on it.

``evaluation.validation_fraction`` sets that fraction of the task's *training* pool aside
before the data is dealt out to clients (drawn from ``numpy_rng(seed, "validation_split")``, so
every process of a run — data-parallel ranks included — carves the same rows; whole units of
near-copies when the task names them, ``Task.units``, e.g. GTSRB's tracks). No client trains
on those rows and the test set is untouched: the test set reports the result, the validation
set only decides when to stop. :class:`HoldoutStopping` evaluates the global model on it after
every round (``val/<metric>``) and, with ``evaluation.patience > 0``, stops the run once the
primary metric has not improved by more than ``evaluation.min_delta`` for that many rounds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .algorithm import RoundReport
from .config import Config
from .data.arrays import ArrayData
from .data.tasks import Task
from .errors import ConfigError
from .run import Callback, RunContext
from .seeding import numpy_rng
from .tree import Params

__all__ = ["HoldoutStopping", "carve_validation"]

PREFIX = "val/"


def carve_validation(config: Config, task: Task) -> tuple[Task, ArrayData | None]:
    """``(task without the validation rows, the validation rows)``; ``(task, None)`` when
    ``evaluation.validation_fraction`` is 0. The returned task is a copy; ``task`` is
    unchanged."""
    fraction = config.evaluation.validation_fraction
    if fraction <= 0:
        return task, None
    n = len(task.train)
    k = int(round(n * fraction))
    if k < 1 or k >= n:
        raise ConfigError(
            f"config field 'evaluation.validation_fraction': {fraction} of the {n} training "
            f"examples of task {task.name!r} is {k} examples; the validation set needs at least "
            "one and the clients must keep at least one. Choose another fraction.")
    rng = numpy_rng(config.seed, "validation_split")
    if task.units is None:
        order = rng.permutation(n)
        held, kept = np.sort(order[:k]), np.sort(order[k:])
    else:  # whole units, in random order, until at least k rows are held out
        names, unit_of = np.unique(np.asarray(task.units), return_inverse=True)
        sizes = np.bincount(unit_of, minlength=len(names))
        units = rng.permutation(len(names))
        take = units[:int(np.searchsorted(np.cumsum(sizes[units]), k)) + 1]
        chosen = np.isin(unit_of, take)
        held, kept = np.flatnonzero(chosen), np.flatnonzero(~chosen)
        if len(kept) == 0:
            raise ConfigError(
                f"config field 'evaluation.validation_fraction': {fraction} of task "
                f"{task.name!r}'s {len(names)} units of near-copies leaves the clients none; "
                "choose a smaller fraction.")
    groups = task.groups[kept] if task.groups is not None else None
    kept_units = task.units[kept] if task.units is not None else None
    rest = dataclasses.replace(task, train=task.train.subset(kept), groups=groups,
                               units=kept_units)
    return rest, task.train.subset(held)


class HoldoutStopping(Callback):
    """After every round, evaluate the global params on the validation set with
    ``evaluate_fn(params) -> metrics`` (reported as ``val/<name>``); with ``patience > 0``,
    return a reason to stop once ``val/<metric>`` has not improved by more than ``min_delta``
    for ``patience`` rounds. On a resumed run the best value and the wait are rebuilt from the
    history, so a resumed run stops where an uninterrupted one would."""

    def __init__(self, evaluate_fn: Callable[[Params], dict[str, float]], *, metric: str,
                 lower_is_better: bool, patience: int = 0, min_delta: float = 0.0):
        if patience < 0 or min_delta < 0:
            raise ConfigError(f"HoldoutStopping: patience and min_delta must be >= 0 (got "
                              f"{patience}, {min_delta}).")
        self.evaluate_fn = evaluate_fn
        self.key = f"{PREFIX}{metric}"
        self.sign = -1.0 if lower_is_better else 1.0
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.waited = 0

    def on_run_start(self, ctx: RunContext) -> None:
        """Replay the validation metric of the rounds already run (a resumed run)."""
        self.best, self.waited = None, 0
        for h in ctx.history:
            self._track(h.get(self.key))

    def after_round(self, ctx: RunContext, report: RoundReport) -> str | None:
        """Evaluate on the validation set; a reason to stop once patience runs out."""
        for k, v in self.evaluate_fn(ctx.params()).items():
            report.metrics[f"{PREFIX}{k}"] = v
        self._track(report.metrics.get(self.key))
        if self.patience and self.waited >= self.patience:
            return (f"early stopping: {self.key} (held-out validation set) did not improve "
                    f"for {self.patience} rounds; best {self.best:.4g}")
        return None

    def _track(self, value: Any) -> None:
        if not isinstance(value, int | float) or math.isnan(value):
            return
        if self.best is None or self.sign * (value - self.best) > self.min_delta:
            self.best, self.waited = float(value), 0
        else:
            self.waited += 1
