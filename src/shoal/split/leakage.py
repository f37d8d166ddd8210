"""Leakage measures for split learning.

- :func:`distance_correlation` between a batch of inputs and their activations (Székely et al.
  2007; the quantity NoPeek minimises, Vepakomma et al. 2020). Differentiable.
- :func:`norm_attack_auc` and :func:`direction_attack_auc`: the label-leakage attacks of Li et
  al. (2021, "Label Leakage and Protection in Two-party Split Learning", ICLR 2022) on the
  gradients returned across the cut, scored as ROC AUC against the true binary labels.
- :func:`decoder_attack`: an honest-but-curious server trains a decoder from activations back
  to inputs on a small leaked set of (input, activation) pairs; its error on other inputs.
- :class:`LabelLeakage`: an observer of the transport that pairs the gradients the server
  returns (``split.backward``, what a client sees) with the true labels of the batch they
  belong to, so the attacks run on exactly what crossed the cut.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from .. import tree
from ..message import COORDINATOR, Message
from ..seeding import derive_seed
from ..transport import Observer

__all__ = ["DecoderLeakage", "LabelLeakage", "decoder_attack", "direction_attack_auc",
           "distance_correlation", "norm_attack_auc"]


def _centered_distances(x: Tensor) -> Tensor:
    x = x.flatten(1)
    sq = (x * x).sum(1)
    # sqrt of a clamped squared distance: finite gradient at the zero diagonal.
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(1e-12).sqrt()
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: Tensor, z: Tensor) -> Tensor:
    """The sample distance correlation of ``x`` and ``z`` (rows are examples), in ``[0, 1]``;
    0 when a batch has fewer than 2 examples or one side is constant."""
    if x.shape[0] < 2:
        return z.sum() * 0  # zero, still attached to z's graph
    a, b = _centered_distances(x), _centered_distances(z)
    xy, xx, yy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    denom = (xx * yy).sqrt()
    if float(denom.detach()) <= 1e-12:  # one side constant: no dependence to measure
        return z.sum() * 0
    return (xy.clamp_min(1e-12) / denom).sqrt()


def _binary(labels: Tensor) -> Tensor:
    y = labels.flatten().to(torch.int64)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("label-leakage attacks need binary labels (0 or 1).")
    return y


def norm_attack_auc(grads: Tensor, labels: Tensor) -> float:
    """AUC of the norm attack: score each example by the norm of its returned gradient (the
    rare positive class gets larger gradients). NaN unless both labels occur."""
    y = _binary(labels)
    if len(torch.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y.numpy(), grads.flatten(1).norm(dim=1).double().numpy()))


def direction_attack_auc(grads: Tensor, labels: Tensor) -> float:
    """AUC of the direction attack: score each example by the cosine similarity of its returned
    gradient with that of one example the attacker knows to be positive (the first positive;
    it is left out of the scoring). NaN unless both labels occur among the others."""
    y = _binary(labels)
    g = grads.flatten(1).double()
    positives = torch.nonzero(y == 1).flatten()
    if len(positives) == 0:
        return float("nan")
    ref = int(positives[0])
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[ref] = False
    if len(torch.unique(y[keep])) < 2:
        return float("nan")
    cos = F.cosine_similarity(g[keep], g[ref].unsqueeze(0), dim=1)
    return float(roc_auc_score(y[keep].numpy(), cos.numpy()))


def decoder_attack(bottom: nn.Module, leaked: Tensor, target: Tensor, *, hidden: int = 256,
                   epochs: int = 300, lr: float = 1e-2, seed: int = 0) -> float:
    """Mean squared error of a decoder (activations -> inputs, an MLP with ``hidden`` units)
    trained full-batch with Adam for ``epochs`` steps on the ``leaked`` inputs and their
    activations under ``bottom``, measured on the ``target`` inputs."""
    with torch.no_grad():
        was = bottom.training
        bottom.eval()
        a_leak, a_target = bottom(leaked).flatten(1), bottom(target).flatten(1)
        bottom.train(was)
    x_leak, x_target = leaked.flatten(1), target.flatten(1)
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(seed, "decoder_attack"))
        decoder = nn.Sequential(nn.Linear(a_leak.shape[1], hidden), nn.ReLU(),
                                nn.Linear(hidden, x_leak.shape[1]))
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(decoder(a_leak), x_leak).backward()
        opt.step()
    with torch.no_grad():
        return float(F.mse_loss(decoder(a_target), x_target))


class DecoderLeakage:
    """A callback: every ``every`` rounds (and after the last), :func:`decoder_attack` on the
    current bottom of ``split`` with ``leaked`` pairs and ``target`` inputs, written as
    ``leak/decoder_mse`` in the round's metrics."""

    def __init__(self, split: Any, leaked: Tensor, target: Tensor, *, every: int = 1,
                 rounds: int | None = None, seed: int = 0):
        self.bottom = copy.deepcopy(split.bottom)
        self.leaked, self.target = leaked, target
        self.every, self.rounds, self.seed = every, rounds, seed

    def after_round(self, ctx: Any, report: Any) -> None:
        """Run the attack on this round's bottom when due."""
        if report.round % self.every and report.round != self.rounds:
            return
        params = ctx.params()
        tree.load_params_(self.bottom, {k: params[k] for k in tree.params_of(self.bottom)})
        report.metrics["leak/decoder_mse"] = decoder_attack(self.bottom, self.leaked,
                                                            self.target, seed=self.seed)


LabelsOf = Callable[[Message], "Tensor | None"]
"""``labels_of(forward_reply) -> labels``: the true labels of the batch a ``split.forward``
reply carries the activations of (``None``: none are known)."""


class LabelLeakage(Observer):
    """Watches split learning's messages for the label-leakage attacks (Li et al. 2021).

    ``split.forward`` replies give, through ``labels_of``, the true labels of each client's
    batch (by client, round and step); ``split.backward`` requests carry the gradients the
    server returns for it — what a label-less client sees. Binary-labelled batches are paired,
    at most ``limit`` examples per :meth:`figures` call; :meth:`figures` scores the attacks on
    them and starts afresh.
    """

    def __init__(self, labels_of: LabelsOf, limit: int = 4096):
        self.labels_of = labels_of
        self.limit = limit
        self._labels: dict[tuple[str, int, int], Tensor] = {}
        self.grads: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.rows = 0

    def __repr__(self) -> str:
        return f"LabelLeakage({self.rows} rows)"

    def on_message(self, message: Message, nbytes: int) -> None:
        """Keep forward labels and pair backward gradients with them."""
        if message.kind == "split.forward" and message.dst == COORDINATOR:
            labels = self.labels_of(message)
            if labels is not None and message.error is None:
                self._labels[(message.src, message.round, message.config.get("step", -1))] = \
                    labels
        elif message.kind == "split.backward" and message.src == COORDINATOR:
            labels = self._labels.pop((message.dst, message.round,
                                       message.config.get("step", -1)), None)
            grad = message.tensors.get("grad")
            if labels is None or grad is None or self.rows >= self.limit:
                return
            if labels.dim() != 1 or labels.is_floating_point() \
                    or not bool(((labels == 0) | (labels == 1)).all()):
                return
            take = min(len(labels), self.limit - self.rows)
            self.grads.append(grad[:take].detach().flatten(1).clone())
            self.labels.append(labels[:take].detach().clone())
            self.rows += take

    def part(self) -> LabelLeakage:
        """An empty observer of the same kind (for a worker process)."""
        return LabelLeakage(self.labels_of, self.limit)

    def merge(self, other: Observer) -> None:
        """Add a worker's pairs."""
        assert isinstance(other, LabelLeakage)
        for g, y in zip(other.grads, other.labels, strict=True):
            take = min(len(y), self.limit - self.rows)
            if take <= 0:
                break
            self.grads.append(g[:take])
            self.labels.append(y[:take])
            self.rows += take
        self._labels.update(other._labels)

    def figures(self) -> dict[str, float]:
        """``leak/label_auc_norm`` and ``leak/label_auc_direction`` on the pairs seen since the
        last call (none without binary-labelled pairs); then forget them."""
        out: dict[str, float] = {}
        if self.grads:
            g, y = torch.cat(self.grads), torch.cat(self.labels)
            out = {"leak/label_auc_norm": norm_attack_auc(g, y),
                   "leak/label_auc_direction": direction_attack_auc(g, y)}
        self._labels.clear()
        self.grads, self.labels, self.rows = [], [], 0
        return out
