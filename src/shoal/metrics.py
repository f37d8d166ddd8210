"""Evaluating a model: loss, accuracy and (for binary tasks) ROC AUC, in large batches.

``Evaluator`` is used by the coordinator (central evaluation on its test set), by clients
(federated evaluation on their held-out data) and by the baselines, so every number in a run is
computed the same way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from . import tree
from .data.arrays import ArrayData

__all__ = ["Evaluator", "distribution_summary", "weighted_average"]


class Evaluator:
    """``evaluator(params, data) -> {"loss", "accuracy", "examples"[, "auc"]}``.

    Loads ``params`` into a private replica of ``model`` and evaluates it in batches of
    ``batch_size`` under ``torch.inference_mode``. ``loss_fn`` must average over the batch (it is
    re-weighted by batch size). ``auc=True`` adds the ROC AUC of class 1 (binary tasks).

    Class scores are on dim 1, as ``F.cross_entropy`` expects: ``(B, C)`` outputs with ``(B,)``
    targets, or ``(B, C, T)`` with ``(B, T)`` targets for sequences, where accuracy is then the
    share of correct positions (next-character accuracy).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                 batch_size: int = 2048, auc: bool = False):
        self.model = model
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.auc = auc
        self._replica: nn.Module | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_replica": None}

    def __call__(self, params: Mapping[str, Tensor], data: ArrayData) -> dict[str, float]:
        n = len(data)
        if n == 0:
            return {"examples": 0.0}
        if self._replica is None:
            self._replica = copy.deepcopy(self.model)
        model = self._replica
        tree.load_params_(model, params)
        model.eval()
        loss_sum = 0.0
        correct = labels = 0
        scores: list[Tensor] = []
        targets: list[Tensor] = []
        with torch.inference_mode():
            for xb, yb in data.batches(self.batch_size):
                out = model(xb)
                loss_sum += float(self.loss_fn(out, yb)) * len(yb)
                correct += int((out.argmax(dim=1) == yb).sum())
                labels += yb.numel()
                if self.auc:
                    scores.append(out.softmax(dim=1)[:, 1])
                    targets.append(yb)
        metrics = {"loss": loss_sum / n, "accuracy": correct / labels, "examples": float(n)}
        if self.auc:
            y = torch.cat(targets).numpy()
            s = torch.cat(scores).numpy()
            metrics["auc"] = float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else math.nan
        return metrics


def weighted_average(results: Sequence[Mapping[str, float]], weight_key: str = "examples",
                     ) -> dict[str, float]:
    """The ``weight_key``-weighted mean of every other metric; ``weight_key`` itself is summed.

    NaN values (e.g. an AUC on a client holding one class) are left out of their metric's mean.
    """
    total = math.fsum(r.get(weight_key, 0.0) for r in results)
    out: dict[str, float] = {weight_key: total}
    keys = sorted({k for r in results for k in r if k != weight_key})
    for k in keys:
        pairs = [(r[k], r.get(weight_key, 0.0)) for r in results
                 if k in r and not math.isnan(r[k])]
        w = math.fsum(p[1] for p in pairs)
        if w > 0:
            out[k] = math.fsum(v * wi for v, wi in pairs) / w
    return out


def distribution_summary(values: Sequence[float]) -> dict[str, float]:
    """Worst (minimum), 10th percentile, median and best of per-client values."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {}
    return {"worst": float(v.min()), "p10": float(np.percentile(v, 10)),
            "median": float(np.median(v)), "best": float(v.max())}

