"""``FederatedDataset``: a task's training pool, dealt out to clients as row numbers.

Every client is two ranges of row numbers into one shared pool (``x``, ``y``): its training rows
and its held-out evaluation rows, each a slice ``buffer[start : start + length]`` of one packed
buffer (:class:`Ranges`). A client costs two starts and two lengths, however many clients there
are — a million clients are a few tens of MB — and asking for a client builds two
:class:`ArrayData` views, no copies. Ranges may overlap (a population larger than the data,
:meth:`FederatedDataset.sampled`). :func:`federate` turns a :class:`~shoal.data.tasks.Task`
into one, with a partitioner from :mod:`shoal.data.partition`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..seeding import numpy_rng
from .arrays import ArrayData
from .ids import ClientIds, as_ids
from .partition import packed_partition
from .tasks import Task, task_names

__all__ = ["ClientData", "FederatedDataset", "Ranges", "federate"]


@dataclass(frozen=True)
class ClientData:
    """What one client holds: ``train`` examples, and ``eval``, its own held-out examples for
    federated evaluation (None when the federation was built with ``eval_fraction=0``; empty
    when the client had too few examples to spare one)."""

    train: ArrayData
    eval: ArrayData | None


def _is_label(y: Tensor) -> bool:
    return y.dim() == 1 and not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool


@dataclass(frozen=True)
class Ranges:
    """Row numbers of many clients packed in one buffer: client ``i`` holds
    ``buffer[starts[i] : starts[i] + lengths[i]]`` (int64 tensors; ranges may overlap)."""

    buffer: Tensor
    starts: Tensor
    lengths: Tensor

    @classmethod
    def pack(cls, parts: Sequence[Tensor]) -> Ranges:
        """One range per tensor of row numbers, in order."""
        lengths = torch.tensor([len(p) for p in parts], dtype=torch.int64)
        starts = torch.cumsum(lengths, 0) - lengths
        buffer = torch.cat(list(parts)) if parts else torch.empty(0, dtype=torch.int64)
        return cls(buffer.to(torch.int64), starts, lengths)

    def rows(self, i: int) -> Tensor:
        """Client ``i``'s row numbers (a view)."""
        s = int(self.starts[i])
        return self.buffer[s:s + int(self.lengths[i])]

    def concatenated(self) -> Tensor:
        """Every client's rows, client after client."""
        total = int(self.lengths.sum())
        if total == 0:
            return torch.empty(0, dtype=torch.int64)
        first = torch.cumsum(self.lengths, 0) - self.lengths
        at = torch.repeat_interleave(self.starts - first, self.lengths) + torch.arange(total)
        return self.buffer[at]

    def owners(self) -> Tensor:
        """For each entry of :meth:`concatenated`, the client it belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.lengths)), self.lengths)


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
    ``y``; eval rows may be None: no federated evaluation); ``test`` is the coordinator's test
    set; ``info`` records how the federation was made (partition method, options, seed) and is
    reported by :meth:`describe`. Large populations are built without a mapping, from packed
    :class:`Ranges` (:meth:`from_ranges`, :meth:`sampled`).
    """

    def __init__(self, x: Tensor, y: Tensor,
                 clients: Mapping[str, tuple[Tensor, Tensor | None]],
                 test: ArrayData | None = None, *, info: Mapping[str, Any] | None = None):
        if not clients:
            raise DataError("FederatedDataset: no clients; expected at least one.")
        n = int(x.shape[0])
        for cid in clients:
            if not isinstance(cid, str):
                raise DataError(f"FederatedDataset: client ids must be strings (got {cid!r}).")
        ids = sorted(clients)
        train = [_index(f"client {c!r} train rows", clients[c][0], n) for c in ids]
        held = [clients[c][1] for c in ids]
        has_eval = [h is not None for h in held]
        if any(has_eval) and not all(has_eval):
            raise DataError("FederatedDataset: either every client has eval rows or none does "
                            "(None).")
        evals = (Ranges.pack([_index(f"client {c!r} eval rows", h, n)  # type: ignore[arg-type]
                              for c, h in zip(ids, held, strict=True)])
                 if all(has_eval) else None)
        self._setup(x, y, ids, Ranges.pack(train), evals, test, info)

    @classmethod
    def from_ranges(cls, x: Tensor, y: Tensor, ids: Sequence[str], train: Ranges,
                    held: Ranges | None = None, test: ArrayData | None = None, *,
                    info: Mapping[str, Any] | None = None) -> FederatedDataset:
        """Clients ``ids[i]`` holding ``train.rows(i)`` (and ``held.rows(i)`` for evaluation),
        without a Python object per client; ``ids`` is best a :class:`ClientIds`."""
        out = cls.__new__(cls)
        n = int(x.shape[0])
        for name, r in (("train", train), ("eval", held)):
            if r is None:
                continue
            if len(r.starts) != len(ids) or len(r.lengths) != len(ids):
                raise DataError(f"FederatedDataset.from_ranges: {len(ids)} ids but {name} ranges "
                                f"for {len(r.starts)} clients; expected one range per id.")
            _index(f"{name} ranges' buffer", r.buffer, n)
            if len(ids) and (int((r.starts + r.lengths).max()) > len(r.buffer)
                             or int(r.starts.min()) < 0 or int(r.lengths.min()) < 0):
                raise DataError(f"FederatedDataset.from_ranges: a {name} range lies outside "
                                f"its buffer of {len(r.buffer)} rows.")
        if not len(ids):
            raise DataError("FederatedDataset: no clients; expected at least one.")
        out._setup(x, y, ids, train, held, test, info)
        return out

    @classmethod
    def sampled(cls, x: Tensor, y: Tensor, num_clients: int, size: int, seed: int,
                test: ArrayData | None = None) -> FederatedDataset:
        """A population of ``num_clients`` clients of ``size`` examples each, more than the pool
        holds if need be (cross-device simulation at scale): client ``i`` holds ``size``
        consecutive rows of one random permutation of the pool, from a random start (wrapping
        around), so clients overlap and a client holds no row twice (``size`` <= pool)."""
        n = int(x.shape[0])
        if not 1 <= size <= n:
            raise DataError(f"FederatedDataset.sampled: size must be in [1, {n}] (the pool's "
                            f"examples), got {size}.")
        rng = numpy_rng(seed, "sampled-population")
        perm = torch.from_numpy(rng.permutation(n))
        buffer = torch.cat([perm, perm[:size - 1]])  # a window may wrap around
        starts = torch.from_numpy(rng.integers(0, n, num_clients))
        lengths = torch.full((num_clients,), size, dtype=torch.int64)
        info = {"partition": "sampled", "num_clients": num_clients, "size": size, "seed": seed}
        return cls.from_ranges(x, y, ClientIds(num_clients), Ranges(buffer, starts, lengths),
                               None, test, info=info)

    def _setup(self, x: Tensor, y: Tensor, ids: Sequence[str], train: Ranges,
               held: Ranges | None, test: ArrayData | None,
               info: Mapping[str, Any] | None) -> None:
        if x.shape[0] != y.shape[0]:
            raise DataError(f"FederatedDataset: x has {x.shape[0]} rows but y has {y.shape[0]}; "
                            "expected one target per example.")
        self.x = x
        self.y = y
        self.test = test
        self.info: dict[str, Any] = dict(info or {})
        numbered = ClientIds(len(ids))
        self._ids: Sequence[str] = numbered if numbered == ids else as_ids(ids)
        self._position: dict[str, int] | None = (
            None if isinstance(self._ids, ClientIds)
            else {c: i for i, c in enumerate(self._ids)})
        self._train = train
        self._held = held

    def __len__(self) -> int:
        """The number of clients."""
        return len(self._ids)

    def __repr__(self) -> str:
        how = ", ".join(f"{k}={v!r}" for k, v in self.info.items() if k != "task")
        task = self.info.get("task")
        return (f"FederatedDataset({task + ', ' if task else ''}{len(self)} clients, "
                f"{int(self._train.lengths.sum())} training examples"
                f"{', ' + how if how else ''})")

    def client_ids(self) -> Sequence[str]:
        """All client ids, sorted (``client-000`` before ``client-001``): a
        :class:`ClientIds` for numbered clients (no string per client), else a new list."""
        return self._ids if isinstance(self._ids, ClientIds) else list(self._ids)

    def _pos(self, cid: str) -> int:
        ids = self._ids
        i = ids.position(cid) if isinstance(ids, ClientIds) else \
            (self._position or {}).get(cid)
        if i is None:
            some = ", ".join(repr(c) for c in ids[:3]) + (", ..." if len(ids) > 3 else "")
            raise DataError(
                f"FederatedDataset: unknown client id {cid!r}; expected one of the {len(ids)} "
                f"ids ({some}); see client_ids()."
            )
        return i

    def _rows(self, cid: str) -> tuple[Tensor, Tensor | None]:
        i = self._pos(cid)
        return self._train.rows(i), None if self._held is None else self._held.rows(i)

    def client(self, cid: str) -> ClientData:
        """Client ``cid``'s training and evaluation examples, as views over the shared pool."""
        train, held = self._rows(cid)
        return ClientData(ArrayData(self.x, self.y, train),
                          None if held is None else ArrayData(self.x, self.y, held))

    def with_rows(self, x: Tensor, y: Tensor, owners: Tensor) -> FederatedDataset:
        """A copy with examples ``x[i], y[i]`` added to the training data of the client at
        position ``owners[i]`` (of :meth:`client_ids`); evaluation rows and the test set are
        unchanged (the audits' canaries, :mod:`shoal.audits.planted`)."""
        if not (len(x) == len(y) == len(owners)):
            raise DataError(f"FederatedDataset.with_rows: {len(x)} inputs, {len(y)} targets "
                            f"and {len(owners)} owners; expected one of each per example.")
        n = int(self.x.shape[0])
        owners = owners.to(torch.int64)
        extra = torch.arange(n, n + len(y), dtype=torch.int64)
        parts = [torch.cat([self._train.rows(i), extra[owners == i]])
                 for i in range(len(self._ids))]
        return FederatedDataset.from_ranges(
            torch.cat([self.x, x.to(self.x.dtype)]), torch.cat([self.y, y.to(self.y.dtype)]),
            self._ids, Ranges.pack(parts), self._held, self.test,
            info={**self.info, "added_rows": len(y)})

    def num_examples(self, cid: str) -> int:
        """The number of training examples of client ``cid`` (FedAvg's weight)."""
        return int(self._train.lengths[self._pos(cid)])

    def pooled_train(self) -> ArrayData:
        """Every client's training rows together: the data of the centralized baseline."""
        return ArrayData(self.x, self.y, self._train.concatenated())

    def describe(self) -> dict[str, Any]:
        """A small summary: clients, training examples per client (min / median / max / total),
        evaluation examples, and for integer labels the classes per client and the label skew
        (mean total-variation distance between a client's label mix and the pool's: 0 is IID,
        near 1 means clients hold disjoint classes)."""
        sizes = self._train.lengths.numpy()
        out: dict[str, Any] = {
            **self.info,
            "clients": len(self),
            "train_examples": {"total": int(sizes.sum()), "min": int(sizes.min()),
                               "median": float(np.median(sizes)), "max": int(sizes.max())},
            "eval_examples": 0 if self._held is None else int(self._held.lengths.sum()),
        }
        if self.test is not None:
            out["test_examples"] = len(self.test)
        y = self.y.numpy() if _is_label(self.y) else None
        if y is not None and y.size and int(y.min()) >= 0:
            num_classes = int(y.max()) + 1
            rows = self._train.concatenated().numpy()
            owner = self._train.owners().numpy()
            hist = np.bincount(owner * num_classes + y[rows], minlength=len(self) * num_classes
                               ).reshape(len(self), num_classes)  # (clients, classes)
            present = (hist > 0).sum(axis=1)
            pool = hist.sum(axis=0) / max(hist.sum(), 1)
            mix = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
            out["classes_per_client"] = {"min": int(present.min()),
                                         "median": float(np.median(present)),
                                         "max": int(present.max())}
            out["label_skew"] = float(0.5 * np.abs(mix - pool).sum(axis=1).mean())
        return out


def _split_eval(rows: np.ndarray, eval_fraction: float, rng: np.random.Generator,
                units: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train rows, held-out rows)`` of one client: round(fraction * n) rows held out, but a
    client always keeps at least one training example. With ``units`` (the unit of each of
    ``rows``), whole units are held out, in random order, until at least that many rows are
    (as :func:`shoal.holdout.carve_validation` does), one unit at least staying for training:
    no near-copy of a held-out example is trained on (a client with one unit holds none)."""
    n = rows.shape[0]
    k = min(int(np.floor(eval_fraction * n + 0.5)), n - 1)
    if units is None:
        shuffled = rng.permutation(rows)
        return np.sort(shuffled[k:]), np.sort(shuffled[:k])
    names, unit_of = np.unique(units, return_inverse=True)
    sizes = np.bincount(unit_of, minlength=len(names))
    order = rng.permutation(len(names))
    count = int(np.searchsorted(np.cumsum(sizes[order]), k)) + 1 if k > 0 else 0
    held = np.isin(unit_of, order[:min(count, len(names) - 1)])
    return np.sort(rows[~held]), np.sort(rows[held])


def _expand_units(unit_rows: np.ndarray, unit_lengths: np.ndarray,
                  unit_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A partition of units (client ``i``: the ``i``-th segment of ``unit_rows``, ``unit_lengths
    [i]`` units long) as a partition of rows: ``(rows, lengths)``, each client's rows (of
    ``unit_of``, the unit of each row) sorted."""
    by_unit = np.argsort(unit_of, kind="stable")
    sizes = np.bincount(unit_of, minlength=int(unit_of.max()) + 1 if len(unit_of) else 0)
    starts = np.cumsum(sizes) - sizes
    taken = sizes[unit_rows]
    offsets = np.repeat(starts[unit_rows] - (np.cumsum(taken) - taken), taken)
    rows = by_unit[offsets + np.arange(int(taken.sum()))]
    client = np.repeat(np.arange(len(unit_lengths)), unit_lengths)
    lengths = np.bincount(client, weights=taken, minlength=len(unit_lengths)).astype(np.int64)
    owner = np.repeat(np.arange(len(unit_lengths)), lengths)
    return rows[np.lexsort((rows, owner))].astype(np.int64), lengths


def federate(task: Task, *, partition: str | None = None, num_clients: int | None = None,
             seed: int = 0, eval_fraction: float = 0.2, **options: Any) -> FederatedDataset:
    """Deal ``task.train`` out to clients and hold out ``eval_fraction`` of each for evaluation.

    ``partition`` and ``num_clients`` default to ``task.default_partition`` (its options too,
    unless another method is named); other ``options`` go to the partitioner (``alpha``,
    ``shards_per_client``, ``min_size``). ``"natural"`` uses ``task.groups``. A task with
    ``units`` of near-copies (GTSRB's tracks) is dealt out by whole units — the numbered
    methods partition the units, each labelled by its first row, and ``min_size`` counts units
    — and each client's held-out rows are whole units too, so no client is evaluated on
    near-copies of what it trained on. The partition is
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
    unit_of = (np.unique(np.asarray(task.units), return_inverse=True)[1]
               if task.units is not None else None)
    if unit_of is not None and method != "natural":  # deal whole units out
        first = np.unique(unit_of, return_index=True)[1]
        ids, unit_rows, unit_lengths = packed_partition(
            method, labels[first], num_clients, numpy_rng(seed, "partition"), **opts)
        rows, lengths = _expand_units(unit_rows, unit_lengths, unit_of)
    else:
        ids, rows, lengths = packed_partition(method, labels, num_clients,
                                              numpy_rng(seed, "partition"), **opts)
    pooled = pool_rows[rows]  # the partition's positions, as rows of task.train.x
    if eval_fraction == 0:  # no held-out rows: the packed partition is the federation
        train = Ranges(torch.from_numpy(pooled), torch.from_numpy(np.cumsum(lengths) - lengths),
                       torch.from_numpy(lengths))
        held = None
    else:
        rng = numpy_rng(seed, "eval_split")
        trains, helds = [], []
        cuts = np.cumsum(lengths)[:-1]
        part_units = (np.split(unit_of[rows], cuts) if unit_of is not None
                      else [None] * len(lengths))
        for part, units in zip(np.split(pooled, cuts), part_units, strict=True):
            t, h = _split_eval(part, eval_fraction, rng, units)
            trains.append(torch.from_numpy(t))
            helds.append(torch.from_numpy(h))
        train, held = Ranges.pack(trains), Ranges.pack(helds)
    info = {"task": task.name, "partition": method, "num_clients": len(ids), "seed": seed,
            "eval_fraction": eval_fraction,
            **{k: v for k, v in opts.items() if k != "groups"}}
    return FederatedDataset.from_ranges(task.train.x, task.train.y, ids, train, held, task.test,
                                        info=info)
