"""The ``ai4i`` task: machine failures in the AI4I 2020 predictive-maintenance data.

10,000 milling operations (synthetic data reflecting real industrial maintenance data, Matzka
2020, UCI #601), 339 of which (3.4 %) end in a machine failure. A binary task with rare
positives: the setting in which the gradients returned in split learning leak the labels (Li et
al. 2021). By default the negatives are subsampled (deterministically) so that about 10 % of
the examples are positive. The file ships inside the package (``builtin/ai4i/``, CC BY 4.0,
see ATTRIBUTION.md).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.resources
import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from .arrays import ArrayData
from .partition import stratified_split
from .tasks import Task, register_task

__all__ = ["FEATURES", "SPLIT_SEED", "TEST_FRACTION", "ai4i", "ai4i_mlp"]

SPLIT_SEED = 20201001
"""Seed of the fixed subsampling and train/test split."""
TEST_FRACTION = 0.2
"""Share of each class held out as the central test set."""

_FILE = "ai4i2020.csv"
_SHA256 = "96b2d26374cb9c761d5bd2b6364eb24a43b3dac73e29e306eb92b9d29b10e701"
_NUMERIC = ("Air temperature", "Process temperature", "Rotational speed", "Torque", "Tool wear")
_TYPES = ("L", "M", "H")
FEATURES: tuple[str, ...] = (*_NUMERIC, *(f"Type={t}" for t in _TYPES))
"""The 8 model inputs: five standardised measurements, then the one-hot product type."""


@functools.lru_cache(maxsize=1)
def _read() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    raw = (importlib.resources.files("shoal") / "data" / "builtin" / "ai4i" / _FILE).read_bytes()
    if hashlib.sha256(raw).hexdigest() != _SHA256:
        raise DataError(f"ai4i: the packaged {_FILE} does not match its sha256 (see "
                        "builtin/ai4i/ATTRIBUTION.md); reinstall shoal.")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
    numeric = np.array([[float(r[c]) for c in _NUMERIC] for r in rows], dtype=np.float64)
    kind = np.array([_TYPES.index(r["Type"]) for r in rows], dtype=np.int64)
    y = np.array([int(r["Machine failure"]) for r in rows], dtype=np.int64)
    for a in (numeric, kind, y):
        a.flags.writeable = False
    return numeric, kind, y


def ai4i_mlp(d: int = len(FEATURES), hidden: int = 32) -> nn.Module:
    """An MLP ``d -> hidden -> hidden/2 -> 2`` with ReLU; cut after layer ``"1"`` for split
    learning."""
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2),
                         nn.ReLU(), nn.Linear(hidden // 2, 2))


@register_task("ai4i")
def ai4i(*, positive_fraction: float = 0.1, hidden: int = 32) -> Task:
    """Machine failure (1) or not (0) from 8 features; ``positive_fraction`` of the examples
    positive (negatives subsampled; 0 keeps all 10,000 rows, 3.4 % positive). Features are
    standardised with the training rows' mean and deviation. Default partition: IID over 4
    clients."""
    if isinstance(positive_fraction, bool) or not isinstance(positive_fraction, int | float) \
            or not 0 <= positive_fraction < 1:
        raise ConfigError(f"ai4i: positive_fraction must be a number in [0, 1) "
                          f"(got {positive_fraction!r}).")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 2:
        raise ConfigError(f"ai4i: hidden must be an integer >= 2 (got {hidden!r}).")
    numeric, kind, y = _read()
    rng = np.random.default_rng(SPLIT_SEED)
    rows = np.arange(len(y))
    positives = int(y.sum())
    if positive_fraction > positives / len(y):
        negatives = round(positives * (1 - positive_fraction) / positive_fraction)
        keep_neg = rng.choice(np.flatnonzero(y == 0), size=negatives, replace=False)
        rows = np.sort(np.concatenate([np.flatnonzero(y == 1), keep_neg]))
    train_pos, test_pos = stratified_split(y[rows], TEST_FRACTION, rng)
    train_rows, test_rows = rows[train_pos], rows[test_pos]
    mean = numeric[train_rows].mean(0)
    std = numeric[train_rows].std(0)
    x = np.concatenate([(numeric - mean) / std, np.eye(len(_TYPES))[kind]], axis=1)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y)
    return Task(
        name="ai4i",
        model_fn=functools.partial(ai4i_mlp, len(FEATURES), hidden),
        loss_fn=F.cross_entropy,
        train=ArrayData(xt, yt, torch.from_numpy(train_rows)),
        test=ArrayData(xt, yt, torch.from_numpy(test_rows)),
        num_classes=2,
        default_partition={"partition": "iid", "num_clients": 4},
        description=(
            f"AI4I 2020 predictive maintenance: {len(train_rows):,} training and "
            f"{len(test_rows):,} test operations, {100 * y[rows].mean():.1f} % machine failures; "
            f"8 features; MLP 8-{hidden}-{hidden // 2}-2."
        ),
        attribution=(
            "AI4I 2020 Predictive Maintenance Dataset (Matzka 2020, UCI #601, "
            "doi:10.24432/C5HS5C), synthetic; CC BY 4.0."
        ),
    )
