"""``FederatedDataset``: a task's training pool, dealt out to clients as row numbers.

Every client is two index tensors into one shared pool (``x``, ``y``): its training rows and its
held-out evaluation rows. Memory grows with the data, not with the number of clients, and
asking for a client builds two :class:`ArrayData` views, no copies. :func:`federate` turns a
:class:`~shoal.data.tasks.Task` into one, with a partitioner from :mod:`shoal.data.partition`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..seeding import numpy_rng
from .arrays import ArrayData
from .partition import partition as partition_rows
from .tasks import Task, task_names

__all__ = ["ClientData", "FederatedDataset", "federate"]


@dataclass(frozen=True)
class ClientData:
    """What one client holds: ``train`` examples, and ``eval``, its own held-out examples for
    federated evaluation (None when the federation was built with ``eval_fraction=0``; empty
    when the client had too few examples to spare one)."""

    train: ArrayData
    eval: ArrayData | None


def _is_label(y: Tensor) -> bool:
    return y.dim() == 1 and not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool


def _index(where: str, rows: Tensor | np.ndarray, n: int) -> Tensor:
    t = torch.as_tensor(rows)
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
        raise DataError(f"FederatedDataset: {where} must be a 1-D integer tensor of row numbers "
                        f"(got dtype {t.dtype}, shape {tuple(t.shape)}).")
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise DataError(f"FederatedDataset: {where} has rows outside the pool of {n} examples "
                        f"(got min {int(t.min())}, max {int(t.max())}).")
    return t


class FederatedDataset:
    """Clients as row numbers into one shared pool, plus an optional central test set.

    ``clients`` maps a client id to ``(train rows, eval rows)`` (1-D int64 tensors into ``x`` and
    ``y``; eval rows may be None: no federated evaluation); ``test`` is the coordinator's test set; ``info`` records how the federation was made
    (partition method, options, seed) and is reported by :meth:`describe`.
    """

    def __init__(self, x: Tensor, y: Tensor,
                 clients: Mapping[str, tuple[Tensor, Tensor | None]],
                 test: ArrayData | None = None, *, info: Mapping[str, Any] | None = None):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"FederatedDataset: x has {x.shape[0]} rows but y has {y.shape[0]}; "
                            "expected one target per example.")
        if not clients:
            raise DataError("FederatedDataset: no clients; expected at least one.")
        n = int(x.shape[0])
        self.x = x
        self.y = y
        self.test = test
        self.info: dict[str, Any] = dict(info or {})
        self._clients: dict[str, tuple[Tensor, Tensor | None]] = {}
        for cid in sorted(clients):
            if not isinstance(cid, str):
                raise DataError(f"FederatedDataset: client ids must be strings (got {cid!r}).")
            train, held = clients[cid]
            self._clients[cid] = (
                _index(f"client {cid!r} train rows", train, n),
                None if held is None else _index(f"client {cid!r} eval rows", held, n),
            )

    def __len__(self) -> int:
        """The number of clients."""
        return len(self._clients)

    def __repr__(self) -> str:
        how = ", ".join(f"{k}={v!r}" for k, v in self.info.items() if k != "task")
        task = self.info.get("task")
        return (f"FederatedDataset({task + ', ' if task else ''}{len(self)} clients, "
                f"{sum(len(t) for t, _ in self._clients.values())} training examples"
                f"{', ' + how if how else ''})")

    def client_ids(self) -> list[str]:
        """All client ids, sorted (``client-000`` before ``client-001``)."""
        return list(self._clients)

    def _rows(self, cid: str) -> tuple[Tensor, Tensor | None]:
        try:
            return self._clients[cid]
        except KeyError:
            ids = list(self._clients)
            some = ", ".join(repr(c) for c in ids[:3]) + (", ..." if len(ids) > 3 else "")
            raise DataError(
                f"FederatedDataset: unknown client id {cid!r}; expected one of the {len(ids)} "
                f"ids ({some}); see client_ids()."
            ) from None

    def client(self, cid: str) -> ClientData:
        """Client ``cid``'s training and evaluation examples, as views over the shared pool."""
        train, held = self._rows(cid)
        return ClientData(ArrayData(self.x, self.y, train),
                          None if held is None else ArrayData(self.x, self.y, held))

    def num_examples(self, cid: str) -> int:
        """The number of training examples of client ``cid`` (FedAvg's weight)."""
        return int(self._rows(cid)[0].shape[0])

    def pooled_train(self) -> ArrayData:
        """Every client's training rows together: the data of the centralized baseline."""
        return ArrayData(self.x, self.y, torch.cat([t for t, _ in self._clients.values()]))

    def describe(self) -> dict[str, Any]:
        """A small summary: clients, training examples per client (min / median / max / total),
        evaluation examples, and for integer labels the classes per client and the label skew
        (mean total-variation distance between a client's label mix and the pool's: 0 is IID,
        near 1 means clients hold disjoint classes)."""
        sizes = np.array([len(t) for t, _ in self._clients.values()])
        out: dict[str, Any] = {
            **self.info,
            "clients": len(self),
            "train_examples": {"total": int(sizes.sum()), "min": int(sizes.min()),
                               "median": float(np.median(sizes)), "max": int(sizes.max())},
            "eval_examples": sum(len(e) for _, e in self._clients.values() if e is not None),
        }
        if self.test is not None:
            out["test_examples"] = len(self.test)
        y = self.y.numpy() if _is_label(self.y) else None
        if y is not None and y.size and int(y.min()) >= 0:
            num_classes = int(y.max()) + 1
            hist = np.stack([np.bincount(y[t.numpy()], minlength=num_classes)
                             for t, _ in self._clients.values()])  # (clients, classes)
            present = (hist > 0).sum(axis=1)
            pool = hist.sum(axis=0) / max(hist.sum(), 1)
            mix = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
            out["classes_per_client"] = {"min": int(present.min()),
                                         "median": float(np.median(present)),
                                         "max": int(present.max())}
            out["label_skew"] = float(0.5 * np.abs(mix - pool).sum(axis=1).mean())
        return out


def _split_eval(rows: np.ndarray, eval_fraction: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # round(fraction * n) held out, but a client always keeps at least one training example.
    n = rows.shape[0]
    k = min(int(np.floor(eval_fraction * n + 0.5)), n - 1)
    shuffled = rng.permutation(rows)
    return np.sort(shuffled[k:]), np.sort(shuffled[:k])


def federate(task: Task, *, partition: str | None = None, num_clients: int | None = None,
             seed: int = 0, eval_fraction: float = 0.2, **options: Any) -> FederatedDataset:
    """Deal ``task.train`` out to clients and hold out ``eval_fraction`` of each for evaluation.

    ``partition`` and ``num_clients`` default to ``task.default_partition`` (its options too,
    unless another method is named); other ``options`` go to the partitioner (``alpha``,
    ``shards_per_client``, ``min_size``). ``"natural"`` uses ``task.groups``. The partition is
    drawn from ``numpy_rng(seed, "partition")`` and the evaluation split from
    ``numpy_rng(seed, "eval_split")``, so one seed gives one federation. The task's test set
    becomes the central ``test``.

    >>> fd = federate(load_task("digits"), partition="dirichlet", num_clients=20, alpha=0.1)
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"federate: eval_fraction must be in [0, 1) (got {eval_fraction}); "
                          "0 disables federated evaluation.")
    default = dict(task.default_partition)
    default_method = default.pop("partition", "iid")
    default_clients = default.pop("num_clients", None)
    method = partition or default_method
    if method != default_method:
        default = {}  # another method: the default's options (alpha, ...) do not apply
    if num_clients is None:
        num_clients = default_clients
    opts = {**default, **options}
    if method == "natural":
        if task.groups is None:
            raise ConfigError(
                f"federate: task {task.name!r} has no natural client ids (Task.groups is None); "
                f"tasks that have them: {', '.join(task_names(natural_ids=True)) or 'none'}. "
                "Use partition='dirichlet', 'iid', 'shards' or 'quantity'."
            )
        opts.setdefault("groups", task.groups)

    pool_rows = task.train.index.numpy()  # (n,) rows of task.train.x that form the pool
    y = task.train.y
    # Label-skew partitioners need class labels; other targets (regression) are all "class 0".
    labels = (y[task.train.index].numpy() if _is_label(y)
              else np.zeros(pool_rows.shape[0], dtype=np.int64))
    parts = partition_rows(method, labels, num_clients, numpy_rng(seed, "partition"), **opts)

    rng = numpy_rng(seed, "eval_split")
    clients: dict[str, tuple[Tensor, Tensor | None]] = {}
    for cid in sorted(parts):
        train, held = _split_eval(pool_rows[parts[cid]], eval_fraction, rng)
        clients[cid] = (torch.from_numpy(train), torch.from_numpy(held) if eval_fraction else None)
    info = {"task": task.name, "partition": method, "num_clients": len(clients), "seed": seed,
            "eval_fraction": eval_fraction,
            **{k: v for k, v in opts.items() if k != "groups"}}
    return FederatedDataset(task.train.x, task.train.y, clients, task.test, info=info)
