"""Evaluating a model: the loss and the metrics of the task's kind, in large batches.

``Evaluator`` is used by the coordinator (central evaluation on its test set), by clients
(federated evaluation on their held-out data) and by the baselines, so every number in a run is
computed the same way. What it computes depends on the task's kind (:data:`KINDS`):

==================  =========================================================  =============
kind                metrics (besides ``loss``)                                 primary
==================  =========================================================  =============
``classification``  ``accuracy``, ``f1`` (macro over the classes seen)           ``accuracy``
``binary``          ``accuracy``, ``f1`` (of class 1), ``auc`` (ROC AUC)        ``accuracy``
``regression``      ``rmse``, ``mae``, ``mse`` (over every output element)      ``rmse``
``sequence``        ``perplexity`` (``exp(loss)``), ``accuracy`` (per position)  ``perplexity``
==================  =========================================================  =============

plus any metric of the user's own (:class:`Metric`, or a plain function taken as an error).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from . import tree
from .data.arrays import ArrayData
from .errors import ConfigError, DataError

__all__ = ["KINDS", "KIND_METRICS", "MEAN_METRICS", "Evaluator", "Metric", "MetricFn",
           "default_primary", "per_client", "pooled_derived",
           "distribution_summary", "lower_is_better", "pooled_average", "tail_key",
           "weighted_average"]

MetricFn = Callable[[Tensor, Tensor], float]
"""``fn(outputs, targets) -> float`` over a whole evaluation set (every batch concatenated)."""

KINDS = ("classification", "binary", "regression", "sequence")
"""What a task predicts: one of several classes, one of two, numbers, or a class per position."""

KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("loss", "accuracy", "f1"),
    "binary": ("loss", "accuracy", "f1", "auc"),
    "regression": ("loss", "rmse", "mae", "mse"),
    "sequence": ("loss", "perplexity", "accuracy"),
}
"""The metrics :class:`Evaluator` computes for each kind (``loss`` for every kind)."""

MEAN_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "binary": ("accuracy",),
    "regression": ("mse", "mae"),
    "sequence": ("accuracy",),
}
"""The metrics of each kind (besides ``loss``) that are means over a set's examples, so a
client's value times its examples sums across clients into the pooled value (what secure
federated evaluation can sum); the others derive from them (``rmse``, ``perplexity``:
:func:`pooled_derived`) or do not pool (``f1``, ``auc``)."""

_PRIMARY = {"classification": "accuracy", "binary": "accuracy", "regression": "rmse",
            "sequence": "perplexity"}
_LOWER_IS_BETTER = frozenset({"loss", "rmse", "mae", "mse", "perplexity"})


@dataclass(frozen=True)
class Metric:
    """A metric of the user's own: ``fn(outputs, targets) -> float`` over the whole evaluation
    set, and whether a higher value is better (``False``: an error, such as MAPE)."""

    fn: MetricFn
    higher_is_better: bool = False


def default_primary(kind: str) -> str:
    """The metric a task of ``kind`` is judged by unless it names another."""
    return _PRIMARY[_check_kind(kind)]


def lower_is_better(name: str, metrics: Mapping[str, Metric | MetricFn] | None = None) -> bool:
    """Whether a lower value of metric ``name`` is better: errors, loss and perplexity; a
    user's :class:`Metric` says itself, and a plain function is taken as an error."""
    custom = (metrics or {}).get(name)
    if custom is not None:
        return not (isinstance(custom, Metric) and custom.higher_is_better)
    return name in _LOWER_IS_BETTER


def tail_key(name: str, lower: bool) -> str:
    """The name of the client figure that only a tenth of the clients do worse than:
    ``<name>_p10`` (10th percentile) for a score, ``<name>_p90`` (90th percentile) for an
    error, where higher is worse."""
    return f"{name}_p90" if lower else f"{name}_p10"


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"task kind must be one of {', '.join(KINDS)} (got {kind!r}).")
    return kind


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


class Evaluator:
    """``evaluator(params, data) -> {"loss", <the kind's metrics>, <custom>, "examples"}``.

    Loads ``params`` into a private replica of ``model`` and evaluates it in batches of
    ``batch_size`` under ``torch.inference_mode``. ``loss_fn`` must average over the batch (it is
    re-weighted by batch size). ``kind`` picks the metrics (see the module docstring; default
    ``"classification"``, or ``"binary"`` with ``auc=True``); ``metrics`` adds the user's own,
    ``{name: Metric(fn, higher_is_better) or fn}``, each computed on every output and target of
    the set at once.

    Shapes are checked per kind, and a mismatch is a :class:`~shoal.errors.DataError` saying
    what was expected: class scores on dim 1 as ``F.cross_entropy`` expects, ``(B, C)`` outputs
    with ``(B,)`` integer targets (``C = 2`` for binary), ``(B, C, T)`` with ``(B, T)`` for
    sequences (accuracy is then the share of correct positions); for regression, outputs of
    exactly the targets' shape (a ``(B, 1)`` output against ``(B,)`` targets would broadcast).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                 batch_size: int = 2048, auc: bool = False, kind: str | None = None,
                 metrics: Mapping[str, Metric | MetricFn] | None = None):
        if kind is None:
            kind = "binary" if auc else "classification"
        if auc and kind not in ("binary", "classification"):
            raise ConfigError(f"Evaluator: auc=True is for binary tasks, but kind is {kind!r}; "
                              "drop auc.")
        self.kind = "binary" if auc else _check_kind(kind)
        self.model = model
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.auc = self.kind == "binary"
        self.metrics: dict[str, Metric | MetricFn] = dict(metrics or {})
        for name, m in self.metrics.items():
            if name in KIND_METRICS[self.kind] or name == "examples":
                raise ConfigError(f"Evaluator: metric {name!r} is built in for {self.kind} "
                                  f"tasks; give yours another name (e.g. {name + '_own'!r}).")
            if not callable(m) and not isinstance(m, Metric):
                raise ConfigError(f"Evaluator: metric {name!r} must be a function "
                                  f"fn(outputs, targets) -> float or a shoal.metrics.Metric, "
                                  f"got {type(m).__name__}.")
        self._replica: nn.Module | None = None

    @classmethod
    def for_task(cls, task: Any, model: nn.Module | None = None, *,
                 batch_size: int = 2048) -> Evaluator:
        """The evaluator of a :class:`~shoal.data.tasks.Task`: its loss, kind and metrics,
        on ``model`` (default: a fresh ``task.model_fn()``, built without touching torch's
        global random state; its weights are replaced by each call's params anyway)."""
        if model is None:
            with torch.random.fork_rng():
                model = task.model_fn()
        return cls(model, task.loss_fn, batch_size=batch_size, kind=task.kind,
                   metrics=task.metrics)

    def metric_names(self) -> list[str]:
        """Every metric this evaluator reports, built-in then the user's (not ``examples``)."""
        return [*KIND_METRICS[self.kind], *self.metrics]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_replica": None}

    def check_shapes(self, out: Tensor, y: Tensor) -> None:
        """Raise :class:`~shoal.errors.DataError` unless ``out`` and ``y`` fit the kind."""
        kind = self.kind
        if kind == "regression":
            if out.shape != y.shape:
                raise DataError(
                    f"Evaluator: a regression task needs outputs of exactly the targets' shape; "
                    f"got outputs {_shape(out)} for targets {_shape(y)}. Make them match: end "
                    "the model with nn.Flatten(0) for (B,) targets, or give the targets shape "
                    "(B, 1) (a loss like F.mse_loss would otherwise broadcast them to (B, B)).")
            return
        want = "(B, C, T) for targets (B, T)" if kind == "sequence" else "(B, C) for targets (B,)"
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DataError(
                f"Evaluator: a {kind} task needs integer class indices as targets; got "
                f"{y.dtype} targets of shape {_shape(y)}. Convert them with .long(), or declare "
                "the task kind=\"regression\" if they are numbers to predict.")
        fits = (out.dim() >= 2 and out.shape[0] == y.shape[0] and out.shape[2:] == y.shape[1:]
                and (kind != "sequence" or out.dim() == 3))
        if not fits or out.shape[1] < 2:
            raise DataError(
                f"Evaluator: a {kind} task needs one score per class on dim 1, outputs {want}; "
                f"got outputs {_shape(out)} for targets {_shape(y)}. End the model with one "
                "output per class (e.g. nn.Linear(hidden, num_classes)), or declare the task "
                "kind=\"regression\" if it predicts a number.")
        if kind == "binary" and out.shape[1] != 2:
            raise DataError(
                f"Evaluator: a binary task needs 2 class scores on dim 1, outputs (B, 2); got "
                f"outputs {_shape(out)}. Declare kind=\"classification\" for "
                f"{out.shape[1]} classes, or end the model with 2 logits.")

    def __call__(self, params: Mapping[str, Tensor], data: ArrayData) -> dict[str, float]:
        n = len(data)
        if n == 0:
            return {"examples": 0.0}
        if self._replica is None:
            self._replica = copy.deepcopy(self.model)
        model = self._replica
        tree.load_params_(model, params)
        model.eval()
        regression = self.kind == "regression"
        loss_sum = sq_sum = abs_sum = 0.0
        correct = labels = 0
        confusion: Tensor | None = None  # (C, C): rows targets, columns predictions
        scores: list[Tensor] = []
        outputs: list[Tensor] = []
        targets: list[Tensor] = []
        with torch.inference_mode():
            for xb, yb in data.batches(self.batch_size):
                out = model(xb)
                self.check_shapes(out, yb)
                loss_sum += float(self.loss_fn(out, yb)) * len(yb)
                labels += yb.numel()
                if regression:
                    err = out.double() - yb.double()
                    sq_sum += float((err * err).sum())
                    abs_sum += float(err.abs().sum())
                else:
                    pred = out.argmax(dim=1)
                    correct += int((pred == yb).sum())
                    if self.kind != "sequence":
                        c = out.shape[1]
                        ok = (yb >= 0) & (yb < c)  # leaves out ignore_index-style labels
                        counts = torch.bincount((yb[ok] * c + pred[ok]).long(),
                                                minlength=c * c).reshape(c, c)
                        confusion = counts if confusion is None else confusion + counts
                    if self.auc:
                        scores.append(out.softmax(dim=1)[:, 1])
                if self.metrics:
                    outputs.append(out)
                if self.metrics or self.auc:
                    targets.append(yb)
        loss = loss_sum / n
        metrics: dict[str, float] = {"loss": loss}
        if regression:
            metrics["mse"] = sq_sum / labels
            metrics["rmse"] = math.sqrt(sq_sum / labels)
            metrics["mae"] = abs_sum / labels
        else:
            metrics["accuracy"] = correct / labels
            if self.kind == "sequence":
                metrics["perplexity"] = math.exp(min(loss, 700.0))
            elif confusion is not None:
                metrics["f1"] = _f1(confusion, binary=self.kind == "binary")
        if self.auc:
            y = torch.cat(targets).numpy()
            s = torch.cat(scores).numpy()
            metrics["auc"] = float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else math.nan
        if self.metrics:
            out_all, y_all = torch.cat(outputs), torch.cat(targets)
            for name, m in self.metrics.items():
                fn = m.fn if isinstance(m, Metric) else m
                metrics[name] = float(fn(out_all, y_all))
        metrics["examples"] = float(n)
        return metrics


def _f1(confusion: Tensor, *, binary: bool) -> float:
    """F1 of class 1 (binary), or the mean F1 over the classes that occur among the targets
    or the predictions (macro); NaN where undefined (no positives, none predicted)."""
    cm = confusion.double()
    tp = cm.diagonal()
    fp = cm.sum(dim=0) - tp
    fn = cm.sum(dim=1) - tp
    denom = 2 * tp + fp + fn
    if binary:
        return float(2 * tp[1] / denom[1]) if denom[1] > 0 else math.nan
    seen = denom > 0
    return float((2 * tp[seen] / denom[seen]).mean()) if bool(seen.any()) else math.nan


def per_client(evaluator: Evaluator, params: Mapping[str, Tensor], dataset: Any,
               metric: str) -> dict[str, float]:
    """``metric`` of the model at ``params`` on every client's held-out data (``dataset`` a
    :class:`~shoal.data.federated.FederatedDataset`); clients without held-out data, and
    non-finite values, are left out."""
    values: dict[str, float] = {}
    with torch.no_grad():
        for cid in dataset.client_ids():
            held = dataset.client(cid).eval
            if held is None or len(held) == 0:
                continue
            v = evaluator(params, held).get(metric)
            if isinstance(v, int | float) and math.isfinite(v):
                values[cid] = float(v)
    return values


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


def pooled_average(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """:func:`weighted_average` by examples, with the metrics that do not average recomputed
    from those that do, as if the clients' data were pooled: ``rmse = sqrt(mse)`` and
    ``perplexity = exp(loss)``."""
    out = weighted_average(results)
    out.update(pooled_derived(out, out))
    return out


def pooled_derived(means: Mapping[str, float], wanted: Collection[str]) -> dict[str, float]:
    """The metrics of ``wanted`` that do not average, from the pooled means they derive from:
    ``rmse = sqrt(mse)`` and ``perplexity = exp(loss)``."""
    out = {}
    if "rmse" in wanted and "mse" in means:
        out["rmse"] = math.sqrt(means["mse"])
    if "perplexity" in wanted and "loss" in means:
        out["perplexity"] = math.exp(min(means["loss"], 700.0))
    return out


def distribution_summary(values: Sequence[float], *, lower_is_better: bool = False,
                         ) -> dict[str, float]:
    """Worst, tail, median and best of per-client values, NaN left out.

    For a score (``lower_is_better=False``): worst is the minimum and the tail ``p10`` the 10th
    percentile. For an error: worst is the *maximum* and the tail ``p90`` the 90th percentile,
    so in both cases a tenth of the clients do worse than the tail figure.
    """
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {}
    if lower_is_better:
        return {"worst": float(v.max()), "p90": float(np.percentile(v, 90)),
                "median": float(np.median(v)), "best": float(v.min())}
    return {"worst": float(v.min()), "p10": float(np.percentile(v, 10)),
            "median": float(np.median(v)), "best": float(v.max())}
