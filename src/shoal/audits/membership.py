"""Membership inference: can one tell whether an example was in a model's training data?

A model (the global one every client receives, or a client's own after its update) fits its
training examples better than examples it never saw; an attacker who holds a candidate example
tests "member" against "non-member" from the model's output on it. How well it does is the
audit: the ROC curve of the test over known members and non-members, read at a low false
positive rate (Carlini et al. 2022 argue the average-case AUC hides the examples that leak).

* :func:`loss_threshold_scores` — the loss attack (Yeom et al. 2018, "Privacy risk in machine
  learning: analyzing the connection to overfitting"): score ``-loss``, members have lower loss.
* :class:`LiRA` / :func:`lira_scores` — the likelihood-ratio attack (Carlini et al. 2022,
  "Membership inference attacks from first principles"): train shadow models on random halves of
  a candidate pool, fit per example a Gaussian to the scaled logit
  ``log(p / (1 - p))`` of the true class (:func:`scaled_logit`) over the shadows trained with it
  (IN) and without it (OUT), and score the target model's scaled logit by the likelihood ratio
  (online), or by how far above the OUT distribution it lies (offline: no IN shadows needed).
* :func:`roc`, :func:`tpr_at_fpr`, :func:`membership_auc` — how good the scores are.
* :func:`epsilon_bound_tpr` — the most any test can achieve against an ``(ε, δ)``-DP training
  (Kairouz et al. 2015's hypothesis-testing region): a measured TPR above it at that FPR
  disproves the claimed guarantee (a lower bound on ε, as in Jagielski et al. 2020 and
  Nasr et al. 2021).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from torch import Tensor, nn
from torch.func import functional_call

from ..data.arrays import ArrayData
from ..metrics import Evaluator
from ..tree import Params

__all__ = [
    "LiRA",
    "LogitsFn",
    "TrainFn",
    "epsilon_bound_tpr",
    "lira_scores",
    "loss_threshold_scores",
    "membership_auc",
    "model_logits",
    "per_example_loss",
    "roc",
    "scaled_logit",
    "tpr_at_fpr",
]

LogitsFn = Callable[[Mapping[str, Tensor], Tensor], Tensor]
"""``logits_fn(params, x) -> outputs``: the model at ``params`` on a batch ``x``."""

TrainFn = Callable[[Tensor, int], Params]
"""``train_fn(positions, seed) -> params``: train a model on the pool's examples at
``positions`` (int64 positions within the pool's rows) with randomness from ``seed``."""

ModelLike = nn.Module | Evaluator | Callable[..., Tensor]


def model_logits(model: ModelLike) -> LogitsFn:
    """A :data:`LogitsFn` for a module (called with :func:`torch.func.functional_call`, so the
    module itself is left unchanged), an :class:`~shoal.metrics.Evaluator` (its model), or a
    ``logits_fn`` (returned as is)."""
    if isinstance(model, Evaluator):
        model = model.model
    if isinstance(model, nn.Module):
        module = model

        def logits(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(module, dict(params), (x,))

        return logits
    return model


def _xy(data: ArrayData | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return data.tensors() if isinstance(data, ArrayData) else (data[0], data[1])


def per_example_loss(loss_fn: Callable[..., Tensor], out: Tensor, y: Tensor) -> Tensor:
    """``loss_fn`` on each example: ``loss_fn(out, y, reduction="none")`` where it takes a
    ``reduction`` (torch's losses), else one call per example; averaged over any dims after the
    batch's (sequences, multi-output regression). Shape ``(B,)``."""
    try:
        loss = loss_fn(out, y, reduction="none")
    except TypeError:
        loss = torch.stack([loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(len(y))])
    return loss.reshape(len(y), -1).mean(dim=1) if loss.dim() > 1 else loss.reshape(len(y))


def loss_threshold_scores(model: ModelLike, params: Mapping[str, Tensor],
                          data: ArrayData | tuple[Tensor, Tensor], *,
                          loss_fn: Callable[..., Tensor] | None = None,
                          batch_size: int = 2048) -> Tensor:
    """The loss attack's scores (Yeom et al. 2018): ``-loss`` of each example, in ``data``'s
    order; higher means more likely a member.

    ``model`` is an ``nn.Module``, an :class:`~shoal.metrics.Evaluator` (its model and, unless
    ``loss_fn`` is given, its loss) or a :data:`LogitsFn`; ``loss_fn`` defaults to
    ``F.cross_entropy``. Thresholding the scores at ``-t`` is the attack "member iff loss < t";
    :func:`roc` sweeps every threshold.
    """
    if loss_fn is None:
        loss_fn = model.loss_fn if isinstance(model, Evaluator) else F.cross_entropy
    logits = model_logits(model)
    x, y = _xy(data)
    scores = []
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            scores.append(-per_example_loss(loss_fn, logits(params, xb), yb).double())
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


def scaled_logit(outputs: Tensor, y: Tensor) -> Tensor:
    """``log(p_y / (1 - p_y))`` for the softmax probability ``p_y`` of the true class, computed
    stably from the logits as ``z_y - logsumexp(z_{c != y})`` (LiRA's statistic: roughly
    Gaussian over shadow models, where ``p_y`` itself is not). Shape ``(B,)``, float64."""
    z = outputs.detach().double()
    if z.dim() != 2:
        raise ValueError(f"scaled_logit: expected (B, C) class scores, got {tuple(z.shape)}.")
    y = y.reshape(-1).long()
    true = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], -math.inf)
    return true - torch.logsumexp(others, dim=1)


def _normal_logpdf(x: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mu) ** 2 / var)


def lira_scores(target: Tensor, shadow: Tensor, shadow_in: Tensor, *, online: bool = True,
                fixed_variance: bool = False, min_var: float = 1e-6) -> Tensor:
    """LiRA's per-example scores (Carlini et al. 2022); higher means more likely a member.

    Args:
        target: ``(n,)`` the target model's :func:`scaled_logit` on each candidate example.
        shadow: ``(S, n)`` each shadow model's scaled logit on each example.
        shadow_in: ``(S, n)`` bool, whether the example was in that shadow's training set.
        online: score ``log N(target; mu_in, var_in) - log N(target; mu_out, var_out)``, the
            likelihood ratio (every example needs IN and OUT shadows). ``False``: the offline
            variant, with OUT shadows only: ``-log P[Z > target]`` for ``Z ~ N(mu_out, var_out)``,
            the one-sided test's log p-value (large when the target is far above the OUT fit).
        fixed_variance: one variance per distribution (IN, OUT) pooled over all examples
            instead of one per example; what the paper advises with few shadows (< 64).
        min_var: a floor under every variance.

    Returns:
        ``(n,)`` float64 scores.
    """
    target = torch.as_tensor(target).double().reshape(-1)
    shadow = torch.as_tensor(shadow).double()
    mask = torch.as_tensor(shadow_in).bool()
    if shadow.dim() != 2 or shadow.shape != mask.shape or shadow.shape[1] != target.numel():
        raise ValueError(
            f"lira_scores: expected target (n,), shadow and shadow_in (S, n); got "
            f"{tuple(target.shape)}, {tuple(shadow.shape)}, {tuple(mask.shape)}.")

    def fit(sel: Tensor, what: str) -> tuple[Tensor, Tensor]:
        count = sel.sum(0).double()
        if bool((count == 0).any()):
            raise ValueError(
                f"lira_scores: {int((count == 0).sum())} example(s) have no {what} shadow; "
                "train more shadows (LiRA puts each example in exactly half of them)"
                + (", or use online=False" if what == "IN" else "") + ".")
        w = sel.double()
        mu = (w * shadow).sum(0) / count
        sq = (w * (shadow - mu) ** 2).sum(0)
        if fixed_variance:
            var = (sq.sum() / (count - 1).clamp(min=1).sum()).expand_as(mu)
        else:
            var = sq / (count - 1).clamp(min=1)
        return mu, var.clamp(min=min_var)

    mu_out, var_out = fit(~mask, "OUT")
    if not online:
        z = (target - mu_out) / var_out.sqrt()
        return -torch.special.log_ndtr(-z)  # -log P[Z > target]
    mu_in, var_in = fit(mask, "IN")
    return _normal_logpdf(target, mu_in, var_in) - _normal_logpdf(target, mu_out, var_out)


class LiRA:
    """The likelihood-ratio membership attack with shadow models (Carlini et al. 2022).

    ``fit()`` draws which examples of the candidate pool ``data`` each of ``n_shadows`` shadow
    models trains on, each example in exactly half of them (a random half of the shadows per
    example, so each shadow gets about half the pool), trains them with
    ``train_fn(positions, seed)`` and records every shadow's :func:`scaled_logit` on every
    candidate. ``scores(params)`` then scores a target model's candidates with
    :func:`lira_scores` (online or offline).

    The training function is the attacker's copy of the victim's training recipe (for a
    federated client: :class:`~shoal.client.LocalSGD` from the same global model, say); keep it
    pluggable and small in tests. ``model`` is the architecture, or a :data:`LogitsFn`. The
    paper also averages over augmented queries of each example; this class queries the example
    as it is.

    Attributes (after ``fit``): ``shadow`` ``(S, n)`` scaled logits, ``shadow_in`` ``(S, n)``
    bool membership of the shadows' training sets.
    """

    def __init__(self, train_fn: TrainFn, model: nn.Module | LogitsFn,
                 data: ArrayData | tuple[Tensor, Tensor], n_shadows: int = 16, seed: int = 0,
                 *, fixed_variance: bool | None = None, batch_size: int = 2048):
        if n_shadows < 2 or n_shadows % 2:
            raise ValueError(f"LiRA: n_shadows must be even and >= 2 (got {n_shadows}).")
        self.train_fn = train_fn
        self.logits_fn = model_logits(model)
        self.x, self.y = _xy(data)
        self.n_shadows = n_shadows
        self.seed = seed
        self.fixed_variance = n_shadows < 64 if fixed_variance is None else fixed_variance
        self.batch_size = batch_size
        self.shadow: Tensor | None = None
        self.shadow_in: Tensor | None = None

    def __repr__(self) -> str:
        fitted = "fitted" if self.shadow is not None else "not fitted"
        return f"LiRA(n_shadows={self.n_shadows}, pool={len(self.y)}, seed={self.seed}, {fitted})"

    def splits(self) -> Tensor:
        """``(S, n)`` bool: which pool examples each shadow trains on; every column has exactly
        ``S / 2`` trues (a pure function of ``seed``)."""
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.rand(self.n_shadows, len(self.y), generator=gen).argsort(dim=0)
        return order < self.n_shadows // 2

    def confidences(self, params: Mapping[str, Tensor]) -> Tensor:
        """``(n,)`` the :func:`scaled_logit` of the model at ``params`` on every candidate."""
        out = []
        with torch.no_grad():
            for start in range(0, len(self.y), self.batch_size):
                xb = self.x[start:start + self.batch_size]
                yb = self.y[start:start + self.batch_size]
                out.append(scaled_logit(self.logits_fn(params, xb), yb))
        return torch.cat(out)

    def fit(self) -> LiRA:
        """Train the shadows (shadow ``s`` with seed ``seed * 1_000_003 + s``) and record their
        confidences; returns ``self``."""
        mask = self.splits()
        confs = []
        for s in range(self.n_shadows):
            positions = torch.nonzero(mask[s]).reshape(-1)
            params = self.train_fn(positions, self.seed * 1_000_003 + s)
            confs.append(self.confidences(params))
        self.shadow, self.shadow_in = torch.stack(confs), mask
        return self

    def scores(self, params: Mapping[str, Tensor], *, online: bool = True) -> Tensor:
        """``(n,)`` membership scores of the target model at ``params`` on the candidates
        (higher: more likely a member); see :func:`lira_scores`. Fits first if needed."""
        if self.shadow is None or self.shadow_in is None:
            self.fit()
        assert self.shadow is not None and self.shadow_in is not None
        return lira_scores(self.confidences(params), self.shadow, self.shadow_in,
                           online=online, fixed_variance=self.fixed_variance)


def _arrays(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(torch.as_tensor(scores).detach().double().cpu(), dtype=np.float64).reshape(-1)
    m = np.asarray(torch.as_tensor(is_member).detach().cpu(), dtype=bool).reshape(-1)
    if s.shape != m.shape:
        raise ValueError(f"{s.size} scores for {m.size} membership labels.")
    if m.all() or not m.any():
        raise ValueError("membership audit: need both members and non-members.")
    if not np.isfinite(s).all():
        raise ValueError("membership audit: the scores hold NaN or infinity.")
    return s, m


def roc(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of the test "member iff score >= threshold"
    (:func:`sklearn.metrics.roc_curve`, every threshold kept)."""
    s, m = _arrays(scores, is_member)
    fpr, tpr, thresholds = roc_curve(m, s, drop_intermediate=False)
    return fpr, tpr, thresholds


def tpr_at_fpr(scores: Any, is_member: Any, fpr: float) -> float:
    """The highest true positive rate among thresholds whose false positive rate is at most
    ``fpr`` (0 when even the strictest threshold exceeds it): the attack's power at a low
    error rate, Carlini et al. 2022's headline number (e.g. at ``fpr=0.001``)."""
    fprs, tprs, _ = roc(scores, is_member)
    ok = fprs <= fpr + 1e-12
    return float(tprs[ok].max()) if ok.any() else 0.0


def membership_auc(scores: Any, is_member: Any) -> float:
    """The area under the ROC curve of the scores (0.5: no better than chance)."""
    s, m = _arrays(scores, is_member)
    return float(roc_auc_score(m, s))


def epsilon_bound_tpr(fpr: float, epsilon: float, delta: float = 0.0) -> float:
    """The largest TPR any membership test can have at ``fpr`` against an ``(ε, δ)``-DP
    training: ``min(1, e^ε·fpr + δ, 1 - e^-ε·(1 - δ - fpr))`` (the hypothesis-testing region
    of differential privacy, Kairouz et al. 2015). ``ε = 0`` gives ``fpr + δ``."""
    if not 0 <= fpr <= 1:
        raise ValueError(f"epsilon_bound_tpr: fpr must be in [0, 1] (got {fpr}).")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"epsilon_bound_tpr: need epsilon >= 0 and delta in [0, 1] "
                         f"(got {epsilon}, {delta}).")
    if math.isinf(epsilon):
        return 1.0
    bound = min(math.exp(epsilon) * fpr + delta,
                1 - math.exp(-epsilon) * (1 - delta - fpr))
    return float(min(1.0, max(0.0, bound)))
