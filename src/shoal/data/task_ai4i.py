"""The ``ai4i`` task: predictive maintenance of milling machines (AI4I 2020, UCI #601).

10,000 process records of a milling machine (Matzka 2020; synthetic, built to reflect real
maintenance data): air and process temperature, rotational speed, torque and tool wear, and
whether the machine failed (339 failures, 3.4 %). The seeds' industrial scenario: factories
that each see few failures learn a failure predictor together without sharing their process
data. Natural clients: the product-quality variant being machined (``L``ow 6,000 records,
``M``edium 2,997, ``H``igh 1,003), three production lines with different failure rates (3.9 %,
2.8 %, 2.1 %). Any other partition (``dirichlet``, ``quantity``, ...) can simulate more plants.
The CSV ships inside the package (``builtin/ai4i/``, CC BY 4.0, see ATTRIBUTION.md).
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

__all__ = ["FEATURES", "LINES", "SPLIT_SEED", "TEST_FRACTION", "ai4i", "ai4i_mlp", "read_ai4i"]

_FILE = "ai4i2020.csv"
_SHA256 = "96b2d26374cb9c761d5bd2b6364eb24a43b3dac73e29e306eb92b9d29b10e701"

FEATURES = ("Air temperature", "Process temperature", "Rotational speed", "Torque", "Tool wear")
"""The model inputs (standardised with the training pool's mean and standard deviation).

Left out: the ids, the product type (it is the client id) and the five failure-mode flags
(TWF, HDF, PWF, OSF, RNF), which restate the target."""

LINES = ("L", "M", "H")
"""Client ids: the product-quality variant (production line) of each record."""

SPLIT_SEED = 20200601
"""Seed of the fixed per-line train/test split (the same test set in every run)."""

TEST_FRACTION = 0.25
"""Share of each line's records (per outcome) held out as the central test set."""


def read_ai4i() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The packaged table: features ``(10000, 5)`` float64, failure ``(10000,)`` int64 and
    product type ``(10000,)`` str, in file order."""
    raw = (importlib.resources.files("shoal") / "data" / "builtin" / "ai4i" / _FILE).read_bytes()
    if hashlib.sha256(raw).hexdigest() != _SHA256:
        raise DataError(f"ai4i: builtin/ai4i/{_FILE} does not match its sha256 in "
                        "ATTRIBUTION.md; the packaged file was changed. Reinstall shoal.")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
    x = np.array([[float(r[f]) for f in FEATURES] for r in rows])
    y = np.array([int(r["Machine failure"]) for r in rows], dtype=np.int64)
    line = np.array([r["Type"] for r in rows])
    return x, y, line


def ai4i_mlp(d: int = len(FEATURES), hidden: int = 64) -> nn.Module:
    """An MLP ``d -> hidden -> hidden -> 2`` with ReLU (the failure modes are non-linear:
    heat dissipation, power and overstrain failures depend on products and differences of the
    inputs)."""
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 2))


def _keep_rows(y: np.ndarray, positive_fraction: float) -> np.ndarray:
    """Every row, or all failures plus a seeded random subset of the failure-free rows so that
    failures make up ``positive_fraction`` of the rows kept."""
    if isinstance(positive_fraction, bool) or not isinstance(positive_fraction, int | float) \
            or not 0 <= positive_fraction < 1:
        raise ConfigError(f"ai4i: positive_fraction must be a number in [0, 1) "
                          f"(got {positive_fraction!r}); 0 keeps every record.")
    positives = np.flatnonzero(y == 1)
    if positive_fraction <= len(positives) / len(y):
        return np.arange(len(y))
    negatives = round(len(positives) * (1 - positive_fraction) / positive_fraction)
    keep = np.random.default_rng([SPLIT_SEED, 99]).choice(np.flatnonzero(y == 0), negatives,
                                                          replace=False)
    return np.sort(np.concatenate([positives, keep]))


_SUMMARY = ("AI4I 2020 predictive maintenance, 10,000 milling-machine records, 3 production "
            "lines as clients; target: machine failure (3.4 %). 5 process features "
            "standardised with the training pool's mean and std.")


@register_task("ai4i", natural_ids=True, kind="binary",
               summary=_SUMMARY)
def ai4i(*, hidden: int = 64, positive_fraction: float = 0.0) -> Task:
    """AI4I 2020 predictive maintenance: will the machine fail? Three production lines
    (product types L, M, H) are the natural clients; binary target, 3.4 % positives, so ROC
    AUC is reported beside accuracy (which a model that never predicts failure gets to 96.6 %).

    ``positive_fraction`` in (0, 1) keeps every failure and drops failure-free records at random
    (a fixed seed) until failures are that share of the data: a denser binary task, as the
    split-learning label-leakage benchmark uses (0.1). 0 keeps all 10,000 records.
    """
    if hidden < 1:
        raise ConfigError(f"ai4i: hidden must be >= 1 (got {hidden}).")
    x, y, line = read_ai4i()
    kept = _keep_rows(y, positive_fraction)
    train_parts, test_parts = [], []
    for k, name in enumerate(LINES):
        rows = kept[line[kept] == name]
        tr, te = stratified_split(y[rows], TEST_FRACTION, np.random.default_rng([SPLIT_SEED, k]))
        train_parts.append(rows[tr])
        test_parts.append(rows[te])
    train_rows, test_rows = np.concatenate(train_parts), np.concatenate(test_parts)
    mean, std = x[train_rows].mean(axis=0), x[train_rows].std(axis=0)
    xt = torch.from_numpy(((x - mean) / std).astype(np.float32))
    yt = torch.from_numpy(y)
    return Task(
        name="ai4i",
        model_fn=functools.partial(ai4i_mlp, len(FEATURES), hidden),
        loss_fn=F.cross_entropy,
        train=ArrayData(xt, yt, torch.from_numpy(train_rows)),
        test=ArrayData(xt, yt, torch.from_numpy(test_rows)),
        num_classes=2,
        kind="binary",
        groups=line[train_rows],
        test_groups=line[test_rows],
        default_partition={"partition": "natural"},
        description=(
            f"AI4I 2020 predictive maintenance, {len(kept):,} milling-machine records, "
            f"{100 * y[kept].mean():.1f} % failures; "
            "3 production lines (product type L/M/H) as clients; 5 standardised process "
            f"features; 75/25 split per line; MLP 5-{hidden}-{hidden}-2."
        ),
        attribution=(
            "AI4I 2020 Predictive Maintenance Dataset (Stephan Matzka 2020), UCI Machine "
            "Learning Repository, CC BY 4.0; file from RedfoxKingsley/Machine-Failure-Prediction "
            "@ 3e1727a."
        ),
    )
