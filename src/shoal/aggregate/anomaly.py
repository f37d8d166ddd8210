"""Per-client anomaly scores of a round's updates: how far each strays from the crowd.

For the updates a robust reducer keeps (it needs them all), each update is compared with the
round's coordinate-wise median: the cosine of its direction with the median's, and its norm
relative to the median of the norms. A sign flipper points away (cosine < 0); a boosted
backdoor or a scaled update is far longer (ratio > :data:`NORM_RATIO`); a free rider is far
shorter. These are diagnostics, reported in the round's metrics; the defence is the reducer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import tree
from ..tree import Params

__all__ = ["NORM_RATIO", "Anomaly", "anomaly_scores"]

NORM_RATIO = 3.0
"""An update whose norm is more than this many times the median norm (or less than its
inverse) is flagged."""


@dataclass(frozen=True)
class Anomaly:
    """One update's scores: ``cosine`` with the median update, ``norm_ratio`` to the median
    norm, and whether they flag it."""

    cosine: float
    norm_ratio: float

    @property
    def flagged(self) -> bool:
        """Pointing away from the crowd, or far longer or shorter than it."""
        return (self.cosine < 0 or self.norm_ratio > NORM_RATIO
                or self.norm_ratio < 1 / NORM_RATIO)


def anomaly_scores(updates: Sequence[Params]) -> list[Anomaly]:
    """:class:`Anomaly` of each of ``updates`` (in order); empty for none."""
    if not updates:
        return []
    flat = torch.stack([tree.flatten(u)[0].double() for u in updates])  # (n, d)
    median = flat.median(dim=0).values  # (d,)
    norms = flat.norm(dim=1)  # (n,)
    typical = float(norms.median())
    mnorm = float(median.norm())
    out = []
    for i in range(len(updates)):
        denom = float(norms[i]) * mnorm
        cos = float(flat[i] @ median) / denom if denom > 0 else 0.0
        ratio = float(norms[i]) / typical if typical > 0 else 1.0
        out.append(Anomaly(cos, ratio))
    return out
