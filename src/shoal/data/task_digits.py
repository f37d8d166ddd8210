"""The ``digits`` task: scikit-learn's bundled 8x8 handwritten digits (the default task).

1,797 images of 10 digits, shipped inside scikit-learn, so nothing is downloaded. Small enough
that a whole federated run takes seconds on two CPU cores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .arrays import ArrayData
from .partition import stratified_split
from .tasks import Task, register_task

__all__ = ["SPLIT_SEED", "TEST_FRACTION", "digits", "digits_mlp"]

SPLIT_SEED = 20240601
"""Seed of the fixed train/test split: the test set is the same in every run and every seed."""

TEST_FRACTION = 0.2
"""Share of each digit class held out as the central test set."""


@functools.lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # (1797, 64), pixel intensities 0..16 -> [0, 1]
    y = bunch.target.astype(np.int64)  # (1797,)
    # Read-only: the cache is shared by every load in this process.
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def digits_mlp(hidden: int = 128, layers: int = 1) -> nn.Module:
    """An MLP ``64 -> hidden (-> hidden ...) -> 10`` with ``layers`` hidden layers and ReLU:
    input (batch, 64), output logits (batch, 10)."""
    blocks: list[nn.Module] = [nn.Linear(64, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(hidden, 10))


_SUMMARY = ("scikit-learn's 8x8 handwritten digits, 1,797 images, 10 classes; 64 pixels "
            "scaled to [0, 1] (divided by 16); a fixed stratified 80/20 split.")


@register_task("digits", summary=_SUMMARY)
def digits(*, hidden: int = 128, layers: int = 1) -> Task:
    """8x8 digits as flat 64-vectors in [0, 1]; an MLP with ``layers`` hidden layers of
    ``hidden`` units (2 or more leave U-shaped split learning a server part); a fixed stratified
    80/20 train/test split (:data:`SPLIT_SEED`). Default partition: Dirichlet label skew,
    alpha 0.5, over 20 clients."""
    for name, value in (("hidden", hidden), ("layers", layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"digits: {name} must be an integer >= 1 (got {value!r}).")
    x_np, y_np = _arrays()
    train_rows, test_rows = stratified_split(y_np, TEST_FRACTION, np.random.default_rng(SPLIT_SEED))
    # Fresh tensors per load: a caller that edits one task's data cannot change another's.
    x = torch.tensor(x_np)
    y = torch.tensor(y_np)
    model_fn: Callable[[], nn.Module] = functools.partial(digits_mlp, hidden, layers)
    return Task(
        name="digits",
        model_fn=model_fn,
        loss_fn=F.cross_entropy,
        train=ArrayData(x, y, torch.from_numpy(train_rows)),
        test=ArrayData(x, y, torch.from_numpy(test_rows)),
        num_classes=10,
        default_partition={"partition": "dirichlet", "num_clients": 20, "alpha": 0.5},
        description=(
            "Handwritten digits 0-9 as 8x8 grey images (1,797: 1,438 train, 359 test), "
            f"flattened to 64 features in [0, 1]; MLP 64-{'-'.join([str(hidden)] * layers)}-10."
        ),
        attribution=(
            "Optical Recognition of Handwritten Digits (Alpaydin & Kaynak 1998, UCI), the test "
            "part as bundled with scikit-learn (sklearn.datasets.load_digits); CC BY 4.0."
        ),
    )
