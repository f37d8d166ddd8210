"""Tasks: a data set, the model that learns it and its loss, found by name.

A :class:`Task` is everything a run needs to know about *what* is learned: the pool of training
examples (dealt out to clients by :func:`shoal.data.federated.federate`), the central test set,
a fresh-model factory and the loss. Built-in tasks register themselves with
:func:`register_task`; :func:`load_task` builds one by name::

    task = load_task("digits", hidden=64)
    model = task.model_fn()          # fresh and untrained; seed torch first for a fixed init

Built in: ``digits`` (scikit-learn's 8x8 digits, the default), ``fashion_mnist`` (the
Debian-packaged IDX files) and ``heart`` (UCI Heart Disease, one client per hospital).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .arrays import ArrayData

__all__ = ["Task", "TaskFactory", "load_task", "register_task", "task_names", "task_options"]

TaskFactory = Callable[..., "Task"]
"""Builds a :class:`Task` from keyword-only options, e.g. ``digits(*, hidden=128)``."""


@dataclass(eq=False)
class Task:
    """A learning problem: data, a model factory and a loss.

    ``model_fn()`` returns a fresh, untrained model and seeds nothing itself (the caller seeds
    torch). ``loss_fn(output, target)`` is a scalar, the mean over the batch. ``train`` is the
    pool of training examples; ``groups`` (optional) gives the natural client id of each of its
    rows, in ``train``'s order (hospital, writer); ``test_groups`` does the same for ``test``
    so results can be reported per group. ``default_partition`` holds :func:`federate`'s
    defaults, e.g. ``{"partition": "dirichlet", "num_clients": 20, "alpha": 0.5}``.
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

    def __post_init__(self) -> None:
        for what, groups, data in (("groups", self.groups, self.train),
                                   ("test_groups", self.test_groups, self.test)):
            if groups is not None and np.asarray(groups).shape != (len(data),):
                raise DataError(
                    f"Task {self.name!r}: {what} must hold one id per example, shape "
                    f"({len(data)},) (got {np.asarray(groups).shape})."
                )


@dataclass(frozen=True)
class _Entry:
    factory: TaskFactory
    natural_ids: bool
    options: dict[str, Any]  # option name -> default


_REGISTRY: dict[str, _Entry] = {}
# Imported on first lookup, so that importing this module stays cheap and cycle-free.
_BUILTIN_MODULES = ("task_ai4i", "task_digits", "task_fashion_mnist", "task_heart")
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")
        _builtins_loaded = True


def register_task(name: str, *, natural_ids: bool = False) -> Callable[[TaskFactory], TaskFactory]:
    """Register ``factory(*, option=default, ...) -> Task`` under ``name``.

    Options must be keyword-only with defaults; :func:`load_task` rejects any other name.
    ``natural_ids=True`` says the task's ``groups`` define clients (``partition="natural"``).

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
        _REGISTRY[name] = _Entry(factory, natural_ids, options)
        return factory

    return decorate


def task_names(*, natural_ids: bool = False) -> list[str]:
    """Names of the registered tasks, sorted; only those with natural client ids if asked."""
    _load_builtins()
    return sorted(n for n, e in _REGISTRY.items() if e.natural_ids or not natural_ids)


def task_options(name: str) -> dict[str, Any]:
    """The options task ``name`` accepts, with their defaults."""
    return dict(_entry(name).options)


def _entry(name: str) -> _Entry:
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(
            f"load_task: unknown task {name!r}; expected one of {', '.join(task_names())}."
        )
    return _REGISTRY[name]


def load_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with ``options`` (see :func:`task_options`)."""
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
    return task

