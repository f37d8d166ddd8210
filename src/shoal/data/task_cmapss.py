"""The ``cmapss`` task: remaining useful life of turbofan engines (NASA C-MAPSS, FD001).

100 simulated engines run from normal operation to failure (Saxena et al., PHM08), one row of
3 operational settings and 21 sensors per cycle; the test set's 100 other engines stop some
time before failure, and their true remaining useful life (RUL) is given. A regression: predict,
from the last ``window`` cycles of sensor readings, how many cycles an engine has left. Natural
clients: one per engine (each operator holds its own engine's history). The three files ship
inside the package (``builtin/cmapss/``, xz-compressed and unchanged once decompressed; NASA
Prognostics Data Repository, see ATTRIBUTION.md).

Preprocessing follows the field's reference recipe (e.g. Li, Ding & Sun 2018, RESS 172): the 14
sensors that vary in FD001 (2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21), min-max scaled to
[-1, 1] with the training engines' ranges; a piecewise-linear target, the RUL capped at
``max_rul`` = 125 cycles (early in its life an engine's wear is not visible yet); sliding windows
of 30 cycles; the test set scored on each test engine's last window against its true RUL, capped
the same way. Reported: RMSE and MAE in cycles (published FD001 RMSEs: MLP 37.6, CNN 18.4, LSTM
16.1, deep CNN 12.6).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import lzma

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .arrays import ArrayData
from .tasks import Task, register_task

__all__ = ["MAX_RUL", "SENSORS", "WINDOW", "RulScale", "cmapss", "cmapss_mlp", "read_cmapss",
           "scaled_mse", "windows"]

SENSORS = (2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21)
"""The sensors used (1-based, as in the data's readme); the other 7 are constant in FD001."""

WINDOW = 30
"""Default window: cycles of readings per example."""

MAX_RUL = 125
"""Default cap of the remaining useful life (cycles): the piecewise-linear target."""

_SHA256 = {
    "train_FD001.txt": "963b5e22825b34d8b21c69e1aeb4af3e647050eb672ee8834ba4b5d91d2de0f8",
    "test_FD001.txt": "3cda7109ce17bafb5443f2ac926cfcf88154b941b8c4cf95eb55d1ddd6f52851",
    "RUL_FD001.txt": "a19c8ec94931949d0485bdc35118206e9c81c4547b422efb9cf86f4ceddbceca",
}


def _read(name: str) -> np.ndarray:
    folder = importlib.resources.files("shoal") / "data" / "builtin" / "cmapss"
    xz = folder / f"{name}.xz"
    raw = lzma.decompress(xz.read_bytes()) if xz.is_file() else (folder / name).read_bytes()
    if hashlib.sha256(raw).hexdigest() != _SHA256[name]:
        raise DataError(f"cmapss: builtin/cmapss/{name} does not match its sha256 in "
                        "ATTRIBUTION.md; the packaged file was changed. Reinstall shoal.")
    lines = raw.decode("ascii").splitlines()
    width = len(lines[0].split())
    values = np.array(raw.split(), dtype=np.float64)  # whitespace-separated numbers
    if values.size != len(lines) * width:
        raise DataError(f"cmapss: {name} has rows of unequal length; expected {width} values "
                        "on each of its lines.")
    return values.reshape(len(lines), width)


@functools.lru_cache(maxsize=1)
def read_cmapss() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The packaged FD001 tables: train ``(20631, 26)`` and test ``(13096, 26)`` float64 rows
    (unit, cycle, 3 settings, 21 sensors), and the test engines' true RUL ``(100,)``.
    Cached read-only: callers get views they cannot write to."""
    train, test, rul = _read("train_FD001.txt"), _read("test_FD001.txt"), _read("RUL_FD001.txt")
    for a in (train, test, rul):
        a.flags.writeable = False
    return train, test, rul[:, 0]


def windows(x: np.ndarray, units: np.ndarray, window: int, *, last_only: bool = False,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sliding windows over each unit's cycles (rows in cycle order, units contiguous).

    Returns ``(windows (N, window, d), unit (N,), cycles left in the unit after the window's
    last cycle (N,))``. A unit shorter than ``window`` is padded in front with its first row.
    ``last_only`` keeps each unit's last window.
    """
    xs, us, left = [], [], []
    for u in np.unique(units):
        rows = x[units == u]
        if len(rows) < window:
            rows = np.concatenate([np.repeat(rows[:1], window - len(rows), axis=0), rows])
        ends = [len(rows)] if last_only else range(window, len(rows) + 1)
        for end in ends:
            xs.append(rows[end - window:end])
            us.append(u)
            left.append(len(rows) - end)
    return np.stack(xs), np.array(us), np.array(left, dtype=np.float64)


class RulScale(nn.Module):
    """Multiplies by ``scale`` and drops the last dim: ``(B, 1)`` in [-ish 0, 1] -> ``(B,)``
    cycles, so the network learns on a unit scale while the task predicts cycles."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 1) -> (B,)`` times ``scale``."""
        return x.squeeze(-1) * self.scale


def cmapss_mlp(window: int = WINDOW, d: int = len(SENSORS), hidden: int = 64,
               scale: float = MAX_RUL) -> nn.Module:
    """An MLP on a flattened window: ``(B, window, d) -> window*d -> hidden -> hidden -> 1``,
    ReLU, then :class:`RulScale`: ``(B,)`` predicted cycles."""
    return nn.Sequential(nn.Flatten(), nn.Linear(window * d, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1),
                         RulScale(scale))


def scaled_mse(output: Tensor, target: Tensor, scale: float = MAX_RUL) -> Tensor:
    """Mean squared error in units of ``scale`` cycles (``F.mse_loss(output / scale, target /
    scale)``), so the default SGD step sizes suit it; RMSE and MAE are reported in cycles."""
    return F.mse_loss(output / scale, target / scale)


_SUMMARY = ("NASA C-MAPSS FD001, 100 turbofan engines run to failure, one client each; target: "
            "remaining useful life in cycles, capped at 125. 14 varying sensors min-max scaled "
            "to [-1, 1] with the training engines' ranges; windows of 30 cycles.")


@register_task("cmapss", natural_ids=True, kind="regression", summary=_SUMMARY)
def cmapss(*, window: int = WINDOW, max_rul: int = MAX_RUL, hidden: int = 64) -> Task:
    """C-MAPSS FD001 remaining useful life; one client per training engine (100), the central
    test set is the last ``window`` cycles of each of the 100 test engines. See the module
    docstring for the preprocessing. Default partition: natural (engines)."""
    for name, value, least in (("window", window, 1), ("max_rul", max_rul, 1),
                               ("hidden", hidden, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"cmapss: {name} must be an integer >= {least} (got {value!r}).")
    train, test, true_rul = read_cmapss()
    cols = [4 + s for s in SENSORS]  # sensor s is column 5 + s (1-based): 0-based 4 + s
    lo, hi = train[:, cols].min(axis=0), train[:, cols].max(axis=0)

    def scale(rows: np.ndarray) -> np.ndarray:
        return 2 * (rows[:, cols] - lo) / (hi - lo) - 1

    x, unit, left = windows(scale(train), train[:, 0].astype(int), window)
    y = np.minimum(left, max_rul)
    tx, _, test_left = windows(scale(test), test[:, 0].astype(int), window, last_only=True)
    ty = np.minimum(true_rul + test_left, max_rul)  # test_left is 0: the last window
    return Task(
        name="cmapss",
        model_fn=functools.partial(cmapss_mlp, window, len(SENSORS), hidden, float(max_rul)),
        loss_fn=functools.partial(scaled_mse, scale=float(max_rul)),
        train=ArrayData.of(torch.from_numpy(x.astype(np.float32)),
                           torch.from_numpy(y.astype(np.float32))),
        test=ArrayData.of(torch.from_numpy(tx.astype(np.float32)),
                          torch.from_numpy(ty.astype(np.float32))),
        num_classes=0,
        kind="regression",
        groups=np.array([f"engine-{u:03d}" for u in unit]),
        default_partition={"partition": "natural"},
        description=(
            f"NASA C-MAPSS FD001: {len(y):,} training windows of {window} cycles from 100 "
            f"engines (one client each), {len(ty)} test engines; 14 sensors scaled to [-1, 1]; "
            f"RUL capped at {max_rul}; MLP {window * len(SENSORS)}-{hidden}-{hidden}-1."
        ),
        attribution=(
            "C-MAPSS turbofan engine degradation simulation, subset FD001 (A. Saxena, K. Goebel, "
            "D. Simon & N. Eklund, PHM08), NASA Prognostics Data Repository, NASA Ames Research "
            "Center; US government work. Files from alireza-javanmardi/conformal-RUL-intervals "
            "@ 37e450a."
        ),
    )
