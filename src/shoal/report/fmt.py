"""How the report writes a figure: one place, so the tables and the reading agree.

A figure that was not measured is written :data:`DASH`, never a made-up zero.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DASH", "fmt_bytes", "fmt_count", "fmt_number", "fmt_ratio", "fmt_seconds",
           "metric_label"]

DASH = "—"
"""What the report writes for a figure that was not measured."""


def _ok(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v))


def fmt_number(v: Any, spec: str = ".4f") -> str:
    """``v`` formatted with ``spec``, or :data:`DASH` when it is not a finite number."""
    return format(v, spec) if _ok(v) else DASH


def fmt_count(v: Any) -> str:
    """A count with thousands separators (``8,695``), or :data:`DASH`."""
    return f"{round(v):,}" if _ok(v) else DASH


def fmt_bytes(v: Any) -> str:
    """Bytes in decimal units, as ``shoal run`` prints them (``3.1 MB``), or :data:`DASH`."""
    if not _ok(v):
        return DASH
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v:.0f} B"


def fmt_seconds(v: Any) -> str:
    """Seconds (``0.26 s``, ``41 s``, ``12.5 min``), or :data:`DASH`."""
    if not _ok(v):
        return DASH
    if v >= 600:
        return f"{v / 60:.1f} min"
    return f"{v:.0f} s" if v >= 10 else f"{v:.2g} s"


def fmt_ratio(r: float) -> str:
    """A ratio of two figures: ``12×`` from 10 up, ``3.4×`` from 1, ``0.31×`` below."""
    if r >= 10:
        return f"{r:.0f}×"
    if r >= 1:
        return f"{r:.1f}×"
    return f"{r:.2g}×"


_LABELS = {"rmse": "RMSE", "mae": "MAE", "mse": "MSE", "auc": "AUC", "f1": "F1"}


def metric_label(name: str) -> str:
    """How a metric is named in prose and on axes: ``RMSE`` for ``rmse``; others as they are."""
    return _LABELS.get(name, name)
