"""Partitioners: which client holds which example of a pool.

Each partitioner is a pure function of NumPy arrays and a ``np.random.Generator``: the same
generator state gives the same partition. It returns one int64 array of row numbers per client
(each sorted ascending), and together the arrays hold every row exactly once: no example twice,
none left out. :func:`partition` picks one by name, checks its options and names the clients.

==============  ============================================================================
``iid``         shuffled, near-equal sizes (the baseline)
``dirichlet``   label skew: client k's label mix ``q_k ~ Dir(alpha * prior)`` (Hsu et al. 2019)
``shards``      pathological label skew: sorted by label, cut into shards, shards dealt out
                (McMahan et al. 2017)
``quantity``    size skew: sizes ``~ Dir(alpha)`` over clients, examples drawn IID
``natural``     one client per natural group id (hospital, writer, speaker)
==============  ============================================================================
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .ids import ClientIds

__all__ = [
    "METHODS",
    "client_names",
    "dirichlet",
    "iid",
    "natural",
    "packed_partition",
    "partition",
    "quantity_skew",
    "shards",
    "stratified_split",
]


def _rows(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    # Sorted rows read the shared pool in memory order; batches are shuffled later anyway.
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _sorted_segments(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``rows`` cut into consecutive segments of ``lengths``, each sorted ascending — what
    :func:`_rows` does to ``np.split(rows, ...)``, for any number of clients at once."""
    seg = np.repeat(np.arange(lengths.shape[0]), lengths)
    return rows[np.lexsort((rows, seg))].astype(np.int64, copy=False)


def _unpack(buffer: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(buffer, np.cumsum(lengths)[:-1]) if lengths.shape[0] else []


def _near_equal(n: int, num_clients: int) -> np.ndarray:
    """``np.array_split``'s sizes: ``n // k``, the first ``n % k`` one more."""
    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[: n % num_clients] += 1
    return sizes


def _check_clients(where: str, n: int, num_clients: int, min_size: int = 1) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise ConfigError(f"{where}: num_clients must be an integer (got {num_clients!r}).")
    if num_clients < 1:
        raise ConfigError(f"{where}: num_clients must be >= 1 (got {num_clients}).")
    if min_size < 1:
        raise ConfigError(f"{where}: min_size must be >= 1 (got {min_size}).")
    if num_clients * min_size > n:
        raise ConfigError(
            f"{where}: {num_clients} clients with at least {min_size} example(s) each need "
            f"{num_clients * min_size} examples, but there are only {n}; use fewer clients."
        )


def _check_alpha(where: str, alpha: float) -> None:
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"{where}: alpha must be a finite number > 0 (got {alpha!r}).")


def _labels(where: str, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D, one per example (got shape {labels.shape}).")
    return labels


def iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Rows ``0..n-1`` shuffled and split into ``num_clients`` parts whose sizes differ by <= 1."""
    return _unpack(*_iid_packed(n, num_clients, rng))


def _iid_packed(n: int, num_clients: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    _check_clients("iid", n, num_clients)
    sizes = _near_equal(n, num_clients)
    return _sorted_segments(rng.permutation(n), sizes), sizes


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
              *, min_size: int = 1) -> list[np.ndarray]:
    """Label skew: each client's label mix is drawn from a Dirichlet around the global mix.

    The per-client formulation of Hsu, Qi & Brown (2019), "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification", arXiv:1909.06335:

    1. client sizes are near-equal (``n // num_clients``, the remainder spread one by one);
    2. clients are visited in a random order; client k draws its label proportions
       ``q_k ~ Dir(alpha * C * prior)`` (``prior``: the pool's class frequencies, ``C`` classes)
       and its class counts ``~ Multinomial(size_k, q_k)``;
    3. counts are clipped to what is left of each class, and the deficit is re-drawn from
       ``q_k`` renormalised over the classes that still have examples (from the leftover class
       mix when ``q_k`` puts no mass there), until the client is full.

    ``alpha`` is the concentration *per class* (``C * prior`` averages 1 per class), the scale of
    the widely used per-class formulation (each class split over clients by ``Dir(alpha)``;
    Yurochkin et al. 2019, Wang et al. 2020, Li et al. 2022 "NIID-Bench"), so ``alpha = 0.5``
    means the moderate skew it means in those papers. Hsu et al.'s own ``alpha`` is ``C`` times
    this one. Small ``alpha`` (0.05) gives clients dominated by one or two classes; large
    ``alpha`` (100) approaches IID. Sizes are fixed, so the cost is ``O(num_clients * classes)`` draws with no
    rejection loop (the per-class formulation of Yurochkin et al. 2019 resamples until every
    client has ``min_size`` examples, which stalls with many clients). Clients visited last take
    what is left, so their mix is nearer the leftover one; the random order spreads that effect.
    ``min_size`` only checks that ``n // num_clients >= min_size``.
    """
    where = "dirichlet"
    labels = _labels(where, labels)
    n = labels.shape[0]
    _check_clients(where, n, num_clients, min_size)
    if n // num_clients < min_size:
        raise ConfigError(
            f"{where}: near-equal sizes give {n // num_clients} examples per client, below "
            f"min_size={min_size}; use fewer clients or a smaller min_size."
        )
    _check_alpha(where, alpha)
    _, cls, counts = np.unique(labels, return_inverse=True, return_counts=True)
    num_classes = counts.shape[0]
    # pools[c]: the rows of class c in random order; taken front to back through ptr[c].
    order = rng.permutation(n)
    order = order[np.argsort(cls[order], kind="stable")]
    pools = np.split(order, np.cumsum(counts)[:-1])
    ptr = np.zeros(num_classes, dtype=np.int64)
    left = counts.astype(np.int64)  # (classes,) examples not yet dealt
    prior = counts / n

    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[: n % num_clients] += 1
    parts: list[np.ndarray] = [np.empty(0, np.int64)] * num_clients
    for k in rng.permutation(num_clients):
        q = rng.dirichlet(alpha * num_classes * prior)  # (classes,)
        if not np.all(np.isfinite(q)) or q.sum() <= 0:  # underflow guard for tiny alpha
            q = np.eye(num_classes)[rng.choice(num_classes, p=prior)]
        take = np.minimum(rng.multinomial(sizes[k], q), left)
        deficit = int(sizes[k] - take.sum())
        while deficit > 0:
            # Each pass fills the deficit or empties at least one more class: <= classes passes.
            room = left - take
            w = np.where(room > 0, q, 0.0)
            w = w / w.sum() if w.sum() > 0 else room / room.sum()
            take += np.minimum(rng.multinomial(deficit, w), room)
            deficit = int(sizes[k] - take.sum())
        got = [pools[c][ptr[c]:ptr[c] + take[c]] for c in np.flatnonzero(take)]
        ptr += take
        left -= take
        parts[k] = np.concatenate(got)
    return _rows(parts)


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int,
           rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological label skew of McMahan et al. (2017), "Communication-Efficient Learning of
    Deep Networks from Decentralized Data": rows sorted by label are cut into
    ``num_clients * shards_per_client`` contiguous shards (sizes differ by <= 1), and each
    client is dealt ``shards_per_client`` shards at random; with 2 shards most clients see only
    two classes. Rows are shuffled within each label first, so a shard is a random sample of its
    label rather than a run of the file's original order.
    """
    where = "shards"
    labels = _labels(where, labels)
    n = labels.shape[0]
    _check_clients(where, n, num_clients)
    if not isinstance(shards_per_client, int) or shards_per_client < 1:
        raise ConfigError(f"{where}: shards_per_client must be an integer >= 1 "
                          f"(got {shards_per_client!r}).")
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ConfigError(
            f"{where}: {num_clients} clients x {shards_per_client} shards = {num_shards} shards, "
            f"but there are only {n} examples; use fewer clients or fewer shards per client."
        )
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]
    cut = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _rows([np.concatenate([cut[s] for s in row]) for row in deal])


def quantity_skew(n: int, num_clients: int, alpha: float, rng: np.random.Generator,
                  *, min_size: int = 1) -> list[np.ndarray]:
    """Size skew: client sizes ``min_size + Multinomial(n - num_clients * min_size, p)`` with
    ``p ~ Dir(alpha * 1)`` over clients; the examples themselves are drawn IID. Small ``alpha``
    gives a few large clients and many small ones.
    """
    return _unpack(*_quantity_packed(n, num_clients, alpha, rng, min_size))


def _quantity_packed(n: int, num_clients: int, alpha: float, rng: np.random.Generator,
                     min_size: int) -> tuple[np.ndarray, np.ndarray]:
    where = "quantity"
    _check_clients(where, n, num_clients, min_size)
    _check_alpha(where, alpha)
    p = rng.dirichlet(np.full(num_clients, float(alpha)))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:  # underflow guard for tiny alpha
        p = np.full(num_clients, 1.0 / num_clients)
    sizes = (min_size + rng.multinomial(n - num_clients * min_size, p / p.sum())).astype(np.int64)
    return _sorted_segments(rng.permutation(n), sizes), sizes


def natural(groups: np.ndarray | Sequence[Any]) -> dict[str, np.ndarray]:
    """One client per distinct group id: ``{str(group id): rows}`` in sorted group order.

    ``groups`` holds one id per example (strings or integers): the hospital, writer or speaker
    the example came from. No randomness is involved.
    """
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] == 0:
        raise DataError(
            f"natural: groups must be a non-empty 1-D array with one group id per example "
            f"(got shape {g.shape})."
        )
    try:
        ids, inverse = np.unique(g, return_inverse=True)
    except TypeError as e:
        raise DataError(
            f"natural: group ids must be all strings or all integers so they can be sorted "
            f"({e})."
        ) from e
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=ids.shape[0]))[:-1]
    return {str(i): rows for i, rows in zip(ids, _rows(np.split(order, bounds)), strict=True)}


def stratified_split(labels: np.ndarray, test_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into ``(train, test)`` keeping each class's share: a class of ``c`` examples
    sends ``round(test_fraction * c)`` of them, chosen at random, to the test side.
    """
    labels = _labels("stratified_split", labels)
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"stratified_split: test_fraction must be in [0, 1) (got {test_fraction}).")
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        k = math.floor(test_fraction * rows.shape[0] + 0.5)
        test.append(rows[:k])
        train.append(rows[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def client_names(num_clients: int) -> list[str]:
    """``client-00``, ``client-01``, ... ``client-19`` for 20 clients: zero-padded to the width
    of ``num_clients - 1``, so that sorting the names sorts the clients."""
    width = len(str(max(num_clients - 1, 0)))
    return [f"client-{k:0{width}d}" for k in range(num_clients)]


def _natural_tasks() -> str:
    try:  # Imported here: the registry sits above this module and is only needed for the hint.
        from .tasks import task_names
        names = task_names(natural_ids=True)
    except Exception:  # pragma: no cover - the hint must never hide the real error
        names = []
    return ", ".join(names) or "none registered"


def _run_natural(labels: np.ndarray, num_clients: int | None, rng: np.random.Generator,
                 groups: Any = None) -> dict[str, np.ndarray]:
    if groups is None:
        raise ConfigError(
            "partition 'natural': option groups is required (one group id per example, e.g. "
            f"Task.groups); built-in tasks with natural client ids: {_natural_tasks()}."
        )
    g = np.asarray(groups)
    if g.shape[:1] != labels.shape[:1]:
        raise ConfigError(
            f"partition 'natural': groups has {g.shape[0] if g.ndim else 0} entries but there "
            f"are {labels.shape[0]} examples; expected one group id per example."
        )
    parts = natural(g)
    if num_clients is not None and num_clients != len(parts):
        raise ConfigError(
            f"partition 'natural': num_clients must be the number of groups ({len(parts)}) or "
            f"None (got {num_clients}); natural ids fix the clients."
        )
    return parts


Runner = Callable[..., list[np.ndarray]]
# method -> (runner(labels, num_clients, rng, **options), accepted options with their defaults)
_NUMBERED: dict[str, tuple[Runner, dict[str, Any]]] = {
    "iid": (lambda y, k, rng: iid(len(y), k, rng), {}),
    "dirichlet": (lambda y, k, rng, alpha, min_size: dirichlet(y, k, alpha, rng,
                                                               min_size=min_size),
                  {"alpha": 0.5, "min_size": 1}),
    "shards": (lambda y, k, rng, shards_per_client: shards(y, k, shards_per_client, rng),
               {"shards_per_client": 2}),
    "quantity": (lambda y, k, rng, alpha, min_size: quantity_skew(len(y), k, alpha, rng,
                                                                  min_size=min_size),
                 {"alpha": 0.5, "min_size": 1}),
}
METHODS: tuple[str, ...] = (*sorted([*_NUMBERED, "natural"]),)
"""The names :func:`partition` accepts."""


_PACKED: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "iid": lambda y, k, rng: _iid_packed(len(y), k, rng),
    "quantity": lambda y, k, rng, alpha, min_size: _quantity_packed(len(y), k, alpha, rng,
                                                                    min_size),
}


def packed_partition(method: str, labels: np.ndarray, num_clients: int | None,
                     rng: np.random.Generator, **options: Any,
                     ) -> tuple[Sequence[str], np.ndarray, np.ndarray]:
    """:func:`partition` as ``(client ids, rows, lengths)``: client ``i``'s sorted rows are the
    ``i``-th segment of ``rows`` (``lengths[i]`` long), the ids sorted; the same partition as
    :func:`partition` from the same generator. ``iid`` and ``quantity`` build it without a
    Python object per client (a million clients cost their rows and lengths)."""
    if method in _PACKED and method in _NUMBERED:
        runner, defaults = _NUMBERED[method]
        _check_options(method, options, defaults)
        if num_clients is None:
            raise ConfigError(f"partition {method!r}: num_clients is required (got None).")
        rows, lengths = _PACKED[method](_labels("partition", labels), num_clients, rng,
                                        **{**defaults, **options})
        return ClientIds(num_clients), rows, lengths
    parts = partition(method, labels, num_clients, rng, **options)
    ids = sorted(parts)
    lengths = np.array([len(parts[c]) for c in ids], dtype=np.int64)
    rows = (np.concatenate([parts[c] for c in ids]) if ids else np.empty(0, np.int64))
    return ids, rows.astype(np.int64, copy=False), lengths


def _check_options(method: str, options: dict[str, Any], defaults: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(sorted(defaults)) or "none"
        raise ConfigError(f"partition {method!r}: unknown option {unknown[0]!r}; "
                          f"accepted options: {accepted}.")


def partition(method: str, labels: np.ndarray, num_clients: int | None,
              rng: np.random.Generator, **options: Any) -> dict[str, np.ndarray]:
    """Partition the rows of ``labels`` among clients: ``{client id: sorted int64 rows}``.

    ``method`` is one of :data:`METHODS`; options and their defaults: ``dirichlet(alpha=0.5,
    min_size=1)``, ``shards(shards_per_client=2)``, ``quantity(alpha=0.5, min_size=1)``,
    ``natural(groups=...)`` (required; ``num_clients`` may be None). Numbered methods name
    clients ``client-000``, ``client-001``, ...; ``natural`` uses the group ids.

    >>> parts = partition("dirichlet", y, 20, numpy_rng(0, "partition"), alpha=0.3)
    """
    if method == "natural":
        unknown = sorted(set(options) - {"groups"})
        if unknown:
            raise ConfigError(f"partition 'natural': unknown option {unknown[0]!r}; "
                              "accepted options: groups.")
        return _run_natural(_labels("partition", labels), num_clients, rng, options.get("groups"))
    if method not in _NUMBERED:
        raise ConfigError(
            f"partition: unknown method {method!r}; expected one of {', '.join(METHODS)}."
        )
    runner, defaults = _NUMBERED[method]
    _check_options(method, options, defaults)
    if num_clients is None:
        raise ConfigError(f"partition {method!r}: num_clients is required (got None).")
    labels = _labels("partition", labels)
    parts = runner(labels, num_clients, rng, **{**defaults, **options})
    return dict(zip(client_names(num_clients), parts, strict=True))
