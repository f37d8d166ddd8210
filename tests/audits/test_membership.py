"""Membership inference: an overfit model gives its members away to the loss attack and to
LiRA; the ROC helpers and the DP bound agree with hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shoal import tree
from shoal.audits.membership import (
    LiRA,
    epsilon_bound_tpr,
    lira_scores,
    loss_threshold_scores,
    membership_auc,
    per_example_loss,
    roc,
    scaled_logit,
    tpr_at_fpr,
)
from shoal.data.arrays import ArrayData
from shoal.metrics import Evaluator

N = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


@pytest.fixture(scope="module")
def pool():
    """Random features and random labels: nothing to generalise, so a model can only memorise
    its members. Half the pool (``member``) is the target's training set."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    member = torch.zeros(N, dtype=torch.bool)
    member[torch.randperm(N, generator=g)[: N // 2]] = True
    return x, y, member


def make_train_fn(x, y, epochs: int = 150):
    def train_fn(positions: torch.Tensor, seed: int):
        model = mlp(seed)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        xb, yb = x[positions], y[positions]
        for _ in range(epochs):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        return tree.params_of(model)
    return train_fn


@pytest.fixture(scope="module")
def target(pool):
    x, y, member = pool
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_train_fn(x, y)(torch.nonzero(member).reshape(-1), 999)
    finally:
        torch.set_num_threads(before)


def test_loss_threshold_separates_the_members_of_an_overfit_model(pool, target):
    x, y, member = pool
    scores = loss_threshold_scores(mlp(), target, (x, y))
    assert scores.shape == (N,)
    auc = membership_auc(scores, member)
    assert auc > 0.8, auc
    assert float(scores[member].mean()) > float(scores[~member].mean())
    assert tpr_at_fpr(scores, member, 0.1) > 0.3  # chance would be 0.1
    # The same through an Evaluator and ArrayData (its model and loss), in the data's order.
    ev = Evaluator(mlp(), F.cross_entropy)
    data = ArrayData(x, y, torch.arange(N))
    assert torch.allclose(loss_threshold_scores(ev, target, data), scores)


def test_per_example_loss_without_reduction_argument():
    out, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    def mean_only(o, t):
        return F.cross_entropy(o, t)
    assert torch.allclose(per_example_loss(mean_only, out, y),
                          F.cross_entropy(out, y, reduction="none"))


def test_lira_scores_members_higher(pool, target):
    x, y, member = pool
    lira = LiRA(make_train_fn(x, y), mlp(), (x, y), n_shadows=8, seed=1)
    splits = lira.splits()
    assert splits.shape == (8, N) and bool((splits.sum(0) == 4).all())  # each in half of them
    lira.fit()
    online = lira.scores(target)
    offline = lira.scores(target, online=False)
    for scores in (online, offline):
        assert scores.shape == (N,)
        assert float(scores[member].mean()) > float(scores[~member].mean())
        assert membership_auc(scores, member) > 0.75
    assert tpr_at_fpr(online, member, 0.05) > 0.2


def test_lira_scores_by_hand():
    # Example 0: IN shadows near 3, OUT near 0; example 1 the same.
    shadow = torch.tensor([[3.0, 3.1], [2.9, 2.9], [0.1, 0.0], [-0.1, 0.1]])
    shadow_in = torch.tensor([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=torch.bool)
    scores = lira_scores(torch.tensor([3.0, 0.0]), shadow, shadow_in)
    assert scores[0] > 0 > scores[1]
    off = lira_scores(torch.tensor([3.0, 0.0]), shadow, shadow_in, online=False)
    assert off[0] > off[1]
    fixed = lira_scores(torch.tensor([3.0, 0.0]), shadow, shadow_in, fixed_variance=True)
    assert fixed[0] > 0 > fixed[1]
    with pytest.raises(ValueError, match="no IN shadow"):
        lira_scores(torch.zeros(2), shadow, torch.zeros(4, 2, dtype=torch.bool))


def test_scaled_logit_is_log_odds_of_the_true_class():
    out = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    p = out.softmax(1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(scaled_logit(out, y), torch.log(p / (1 - p)))


def test_roc_and_tpr_at_fpr_by_hand():
    scores = [10, 9, 3, 2, 8, 1, 0, -1]
    member = [True, True, True, True, False, False, False, False]
    assert tpr_at_fpr(scores, member, 0.0) == 0.5  # 10, 9 above the best non-member (8)
    assert tpr_at_fpr(scores, member, 0.24) == 0.5
    assert tpr_at_fpr(scores, member, 0.25) == 1.0  # threshold 2 lets 8 in
    assert membership_auc(scores, member) == pytest.approx(0.875)
    fpr, tpr, thr = roc(scores, member)
    assert fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    with pytest.raises(ValueError):
        tpr_at_fpr([1.0, 2.0], [True, True], 0.1)


def test_epsilon_bound_tpr_by_hand():
    assert epsilon_bound_tpr(0.1, 0.0) == pytest.approx(0.1)
    assert epsilon_bound_tpr(0.2, 0.0, 0.1) == pytest.approx(0.3)  # eps 0: fpr + delta
    assert epsilon_bound_tpr(0.1, 1.0) == pytest.approx(math.e * 0.1)
    assert epsilon_bound_tpr(0.5, 1.0) == pytest.approx(1 - 0.5 / math.e)  # the other side
    assert epsilon_bound_tpr(0.01, 1.0, 1e-5) == pytest.approx(math.e * 0.01 + 1e-5)
    assert epsilon_bound_tpr(0.5, 10.0) == pytest.approx(1 - 0.5 * math.exp(-10))
    assert epsilon_bound_tpr(0.5, 1.0, 0.6) == 1.0  # clipped at 1
    assert epsilon_bound_tpr(0.0, math.inf) == 1.0
    values = [epsilon_bound_tpr(f, 2.0, 1e-5) for f in np.linspace(0, 1, 11)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    with pytest.raises(ValueError):
        epsilon_bound_tpr(1.5, 1.0)
