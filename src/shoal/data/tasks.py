"""Tasks: a data set, the model that learns it and its loss, found by name.

A :class:`Task` is everything a run needs to know about *what* is learned: the pool of training
examples (dealt out to clients by :func:`shoal.data.federated.federate`), the central test set,
a fresh-model factory and the loss. Built-in tasks register themselves with
:func:`register_task`; :func:`load_task` builds one by name::

    task = load_task("digits", hidden=64)
    model = task.model_fn()          # fresh and untrained; seed torch first for a fixed init

Built in: ``digits`` (scikit-learn's 8x8 digits, the default), ``fashion_mnist`` (the
Debian-packaged IDX files), ``heart`` (UCI Heart Disease, one client per hospital),
``ai4i`` (AI4I 2020 predictive maintenance, one client per production line), ``cmapss``
(NASA C-MAPSS turbofan engines, remaining useful life: a regression, one client per engine) and
``gtsrb`` (the German traffic-sign benchmark read from a directory, one client per car holding
whole tracks).

A task of the user's own needs no registration to be run from a config: ``load_task`` also
takes ``"package.module:factory"``, imports the module (the current directory first on the
path) and calls ``factory(**options)``, which must return a :class:`Task`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .arrays import ArrayData

if TYPE_CHECKING:
    from ..metrics import Metric, MetricFn

__all__ = ["Task", "TaskFactory", "load_task", "register_task", "task_info", "task_names",
           "task_options"]

TaskFactory = Callable[..., "Task"]
"""Builds a :class:`Task` from keyword-only options, e.g. ``digits(*, hidden=128)``."""


@dataclass(eq=False)
class Task:
    """A learning problem: data, a model factory and a loss.

    ``model_fn()`` returns a fresh, untrained model and seeds nothing itself (the caller seeds
    torch). ``loss_fn(output, target)`` is a scalar, the mean over the batch. ``train`` is the
    pool of training examples; ``groups`` (optional) gives the natural client id of each of its
    rows, in ``train``'s order (hospital, writer); ``test_groups`` does the same for ``test``
    so results can be reported per group. ``units`` (optional) gives, per training row, the
    unit of near-copies it belongs to (a track of one traffic sign photographed 30 times): a
    unit is never split between the clients' data and the coordinator's validation set
    (:func:`shoal.holdout.carve_validation`). ``default_partition`` holds :func:`federate`'s
    defaults, e.g. ``{"partition": "dirichlet", "num_clients": 20, "alpha": 0.5}``.

    ``kind`` says what is predicted and so which metrics are computed
    (:data:`shoal.metrics.KIND_METRICS`): ``"classification"`` (accuracy, F1), ``"binary"``
    (accuracy, F1, ROC AUC), ``"regression"`` (RMSE, MAE) or ``"sequence"`` (perplexity,
    accuracy); empty: ``"binary"`` if ``num_classes == 2`` else ``"classification"``
    (``num_classes`` is 0 for a regression). ``metrics`` adds the user's own, ``{name: fn(outputs, targets) -> float}`` (an
    error: lower is better) or ``{name: shoal.metrics.Metric(fn, higher_is_better=True)}``.
    ``primary`` names the metric the run is judged by (worst client, percentile, summary);
    empty: the kind's default (accuracy, RMSE or perplexity).
    """

    name: str
    model_fn: Callable[[], nn.Module] = field(repr=False)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(repr=False)
    train: ArrayData = field(repr=False)
    test: ArrayData = field(repr=False)
    num_classes: int
    groups: np.ndarray | None = field(default=None, repr=False)
    default_partition: dict[str, Any] = field(default_factory=dict)
    description: str = field(default="", repr=False)
    attribution: str = field(default="", repr=False)
    test_groups: np.ndarray | None = field(default=None, repr=False)
    units: np.ndarray | None = field(default=None, repr=False)
    kind: str = ""
    metrics: dict[str, Metric | MetricFn] = field(default_factory=dict, repr=False)
    primary: str = ""

    def __post_init__(self) -> None:
        from .. import metrics as m

        if not self.kind:
            self.kind = "binary" if self.num_classes == 2 else "classification"
        if self.kind not in m.KINDS:
            raise ConfigError(f"Task {self.name!r}: kind must be one of {', '.join(m.KINDS)} "
                              f"(got {self.kind!r}).")
        for name, fn in self.metrics.items():
            if name in m.KIND_METRICS[self.kind] or name == "examples":
                raise ConfigError(f"Task {self.name!r}: metric {name!r} is built in for "
                                  f"{self.kind} tasks; give yours another name.")
            if not (callable(fn) or isinstance(fn, m.Metric)):
                raise ConfigError(f"Task {self.name!r}: metric {name!r} must be a function "
                                  "fn(outputs, targets) -> float or a shoal.metrics.Metric "
                                  f"(got {type(fn).__name__}).")
        self.primary = self.primary_metric(self.primary)
        for what, groups, data in (("groups", self.groups, self.train),
                                   ("test_groups", self.test_groups, self.test),
                                   ("units", self.units, self.train)):
            if groups is not None and np.asarray(groups).shape != (len(data),):
                raise DataError(
                    f"Task {self.name!r}: {what} must hold one id per example, shape "
                    f"({len(data)},) (got {np.asarray(groups).shape})."
                )

    def metric_names(self) -> list[str]:
        """Every metric an evaluation of this task reports: the kind's, then the user's."""
        from ..metrics import KIND_METRICS

        return [*KIND_METRICS[self.kind], *self.metrics]

    def lower_is_better(self, name: str | None = None) -> bool:
        """Whether a lower value of metric ``name`` (default: the primary) is better."""
        from ..metrics import lower_is_better

        return lower_is_better(name or self.primary, self.metrics)

    def primary_metric(self, name: str = "") -> str:
        """``name`` checked against :meth:`metric_names` (empty: the task's primary, else the
        kind's default); a :class:`~shoal.errors.ConfigError` names the choices."""
        from ..metrics import default_primary

        name = name or getattr(self, "primary", "") or default_primary(self.kind)
        if name not in self.metric_names():
            raise ConfigError(
                f"task {self.name!r}: primary metric {name!r} is not one of its metrics; "
                f"expected one of {', '.join(self.metric_names())} (a {self.kind} task"
                f"{' with metrics of its own' if self.metrics else ''}). Pass "
                "metrics={name: fn} to the Task to add one.")
        return name


@dataclass(frozen=True)
class _Entry:
    factory: TaskFactory
    natural_ids: bool
    options: dict[str, Any]  # option name -> default
    kind: str = "classification"
    summary: str = ""


_REGISTRY: dict[str, _Entry] = {}
# Imported on first lookup, so that importing this module stays cheap and cycle-free.
_BUILTIN_MODULES = ("task_ai4i", "task_cmapss", "task_digits", "task_fashion_mnist",
                    "task_gtsrb", "task_heart")
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")
        _builtins_loaded = True


def register_task(name: str, *, natural_ids: bool = False, kind: str = "classification",
                  summary: str = "") -> Callable[[TaskFactory], TaskFactory]:
    """Register ``factory(*, option=default, ...) -> Task`` under ``name``.

    Options must be keyword-only with defaults; :func:`load_task` rejects any other name.
    ``natural_ids=True`` says the task's ``groups`` define clients (``partition="natural"``).
    ``kind`` is the kind of the tasks it builds (checked on load) and ``summary`` a line on the
    data and its preprocessing; ``shoal tasks`` shows both without loading any data.

    >>> @register_task("my_task")
    ... def my_task(*, hidden: int = 32) -> Task: ...
    """

    def decorate(factory: TaskFactory) -> TaskFactory:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ConfigError(f"register_task: a task named {name!r} is already registered; "
                              "choose another name.")
        options: dict[str, Any] = {}
        for p in inspect.signature(factory).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                raise ConfigError(
                    f"register_task({name!r}): parameter {p.name!r} of {factory.__name__} must be "
                    "keyword-only with a default, e.g. `def task(*, hidden: int = 128)`."
                )
            options[p.name] = p.default
        _REGISTRY[name] = _Entry(factory, natural_ids, options, kind, summary)
        return factory

    return decorate


def task_names(*, natural_ids: bool = False) -> list[str]:
    """Names of the registered tasks, sorted; only those with natural client ids if asked."""
    _load_builtins()
    return sorted(n for n, e in _REGISTRY.items() if e.natural_ids or not natural_ids)


def task_options(name: str) -> dict[str, Any]:
    """The options task ``name`` accepts, with their defaults."""
    if ":" in name:
        return _factory_options(name, _import_factory(name))[0]
    return dict(_entry(name).options)


def task_info(name: str) -> dict[str, Any]:
    """What ``shoal tasks`` shows of registered task ``name``: its kind, metrics, primary
    metric, options, whether it has natural clients and its one-line summary."""
    from ..metrics import KIND_METRICS, default_primary

    e = _entry(name)
    return {"kind": e.kind, "metrics": list(KIND_METRICS[e.kind]),
            "primary": default_primary(e.kind), "options": dict(e.options),
            "natural_ids": e.natural_ids, "summary": e.summary}


def _entry(name: str) -> _Entry:
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(
            f"load_task: unknown task {name!r}; expected one of {', '.join(task_names())}."
        )
    return _REGISTRY[name]


def _import_factory(spec: str) -> TaskFactory:
    """``"package.module:factory"`` -> the factory, the current directory first on the path."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ConfigError(
            f"load_task: task {spec!r} is neither a built-in name nor 'package.module:factory'; "
            "write e.g. name = \"my_tasks:sensors\" for the function sensors in my_tasks.py.")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does; the `shoal` script would not see it
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise  # the module was found, but something it imports was not
        raise ConfigError(
            f"load_task({spec!r}): cannot import module {module_name!r} ({e}). Run from the "
            "directory that holds it, or add that directory to PYTHONPATH.") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(
            f"load_task({spec!r}): module {module_name!r} ({module.__file__}) has no function "
            f"{attr!r}; expected a function that returns a shoal Task.")
    return typing.cast(TaskFactory, factory)


def _factory_options(spec: str, factory: TaskFactory) -> tuple[dict[str, Any], bool]:
    """``({option: default}, accepts any **kwargs)`` of a user's factory."""
    options: dict[str, Any] = {}
    extra = False
    for p in inspect.signature(factory).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = True
        elif p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            options[p.name] = None if p.default is inspect.Parameter.empty else p.default
    return options, extra


def load_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with ``options`` (see :func:`task_options`), or,
    for ``name = "package.module:factory"``, import the module and call
    ``factory(**options)``."""
    if ":" in name:
        factory = _import_factory(name)
        known, extra = _factory_options(name, factory)
        for key in options:
            if key not in known and not extra:
                listed = ", ".join(sorted(known)) or "none"
                raise ConfigError(f"load_task({name!r}): unknown option {key!r}; accepted "
                                  f"options: {listed}.")
        task = factory(**options)
        if not isinstance(task, Task):
            raise ConfigError(f"load_task({name!r}): the factory returned "
                              f"{type(task).__name__}, expected a shoal Task.")
        return task
    entry = _entry(name)
    for key in options:
        if key not in entry.options:
            accepted = ", ".join(sorted(entry.options)) or "none"
            raise ConfigError(
                f"load_task({name!r}): unknown option {key!r}; accepted options: {accepted}."
            )
    task = entry.factory(**options)
    if not isinstance(task, Task):
        raise ConfigError(f"load_task({name!r}): the factory returned {type(task).__name__}, "
                          "expected a Task.")
    if task.kind != entry.kind:
        raise ConfigError(f"load_task({name!r}): the factory returned a {task.kind} task, but "
                          f"it is registered as {entry.kind}; pass kind={task.kind!r} to "
                          "register_task.")
    return task

