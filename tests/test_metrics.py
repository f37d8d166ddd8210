"""Evaluator: loss weighting, accuracy for classes and for sequences, AUC; the metrics of each
task kind against hand-computed values, shape errors, metrics of one's own, and the worst client
for errors (the highest)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shoal.callbacks import FederatedEvaluation
from shoal.data.arrays import ArrayData
from shoal.errors import ConfigError, DataError
from shoal.metrics import Evaluator, Metric, distribution_summary, lower_is_better, tail_key


class _Fixed(nn.Module):
    """Returns the stored outputs for the rows it is given (the row index is the input)."""

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.register_buffer("outputs", outputs)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs[x]


def test_class_accuracy_loss_and_auc_match_a_direct_computation() -> None:
    torch.manual_seed(0)
    out = torch.randn(10, 2)
    y = torch.randint(0, 2, (10,))
    model = _Fixed(out)
    m = Evaluator(model, F.cross_entropy, batch_size=3, auc=True)(
        dict(model.named_parameters()), ArrayData.of(torch.arange(10), y))
    assert m["examples"] == 10
    assert m["accuracy"] == int((out.argmax(1) == y).sum()) / 10
    assert abs(m["loss"] - float(F.cross_entropy(out, y))) < 1e-6


def test_sequence_accuracy_is_the_share_of_correct_positions() -> None:
    torch.manual_seed(0)
    out = torch.randn(6, 5, 7)  # (B, C, T): 5 classes, 7 positions
    y = torch.randint(0, 5, (6, 7))
    model = _Fixed(out)
    m = Evaluator(model, F.cross_entropy, batch_size=4)(
        dict(model.named_parameters()), ArrayData.of(torch.arange(6), y))
    assert m["examples"] == 6
    assert m["accuracy"] == int((out.argmax(1) == y).sum()) / 42


# -- kinds, shapes and metrics of one's own ----------------------------------------------------

def _evaluate(out: torch.Tensor, y: torch.Tensor, **kwargs) -> dict[str, float]:
    model = _Fixed(out)
    return Evaluator(model, kwargs.pop("loss_fn", F.mse_loss), batch_size=3, **kwargs)(
        dict(model.named_parameters()), ArrayData.of(torch.arange(len(y)), y))


def test_regression_rmse_mae_and_mse_match_hand_computed_values() -> None:
    # errors -1, 0, -2, 4: squared 1, 0, 4, 16 (mean 5.25); absolute 1, 0, 2, 4 (mean 1.75)
    m = _evaluate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 2.0, 5.0, 0.0]),
                  kind="regression")
    assert m["mse"] == pytest.approx(5.25) and m["loss"] == pytest.approx(5.25)
    assert m["rmse"] == pytest.approx(math.sqrt(5.25)) and m["mae"] == pytest.approx(1.75)
    assert "accuracy" not in m and m["examples"] == 4


def test_regression_refuses_outputs_that_would_broadcast() -> None:
    with pytest.raises(DataError) as info:
        _evaluate(torch.zeros(4, 1), torch.zeros(4), kind="regression")
    assert str(info.value) == (
        "Evaluator: a regression task needs outputs of exactly the targets' shape; got outputs "
        "(3, 1) for targets (3,). Make them match: end the model with nn.Flatten(0) for (B,) "
        "targets, or give the targets shape (B, 1) (a loss like F.mse_loss would otherwise "
        "broadcast them to (B, B)).")


def test_classification_refuses_a_regression_model_with_a_clear_error() -> None:
    with pytest.raises(DataError) as info:  # (B,) outputs used to raise IndexError
        _evaluate(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    assert str(info.value) == (
        "Evaluator: a classification task needs one score per class on dim 1, outputs (B, C) "
        "for targets (B,); got outputs (3,) for targets (3,). End the model with one output per "
        "class (e.g. nn.Linear(hidden, num_classes)), or declare the task kind=\"regression\" "
        "if it predicts a number.")
    with pytest.raises(DataError) as info:  # (B, 1) outputs used to report accuracy 7.46
        _evaluate(torch.zeros(4, 1), torch.zeros(4, 1))
    assert str(info.value) == (
        "Evaluator: a classification task needs integer class indices as targets; got "
        "torch.float32 targets of shape (3, 1). Convert them with .long(), or declare the task "
        "kind=\"regression\" if they are numbers to predict.")
    with pytest.raises(DataError, match=r"a binary task needs 2 class scores on dim 1, outputs "
                                        r"\(B, 2\); got outputs \(3, 3\)"):
        _evaluate(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), kind="binary",
                  loss_fn=F.cross_entropy)


def test_f1_macro_and_binary_match_hand_computed_values() -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])  # per class (tp, fp, fn): 0 (1,1,1) 1 (2,1,0) 2 (1,0,1)
    out = F.one_hot(pred, 3).float()
    m = _evaluate(out, y, loss_fn=F.cross_entropy)
    assert m["f1"] == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    yb, pb = torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 1, 0, 1])  # tp 2, fp 1, fn 1
    m = _evaluate(F.one_hot(pb, 2).float(), yb, loss_fn=F.cross_entropy, kind="binary")
    assert m["f1"] == pytest.approx(4 / 6) and "auc" in m


def test_sequence_perplexity_is_the_exponential_of_the_token_loss() -> None:
    torch.manual_seed(0)
    out, y = torch.randn(6, 5, 7), torch.randint(0, 5, (6, 7))
    m = _evaluate(out, y, loss_fn=F.cross_entropy, kind="sequence")
    assert m["perplexity"] == pytest.approx(math.exp(float(F.cross_entropy(out, y))), rel=1e-5)


def test_metrics_of_ones_own_see_every_output_and_target() -> None:
    seen: list[int] = []

    def max_error(out: torch.Tensor, y: torch.Tensor) -> float:
        seen.append(len(y))
        return float((out - y).abs().max())

    m = _evaluate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 2.0, 5.0, 0.0]),
                  kind="regression", metrics={"max_error": max_error,
                                              "hits": Metric(lambda o, y: 0.5, True)})
    assert m["max_error"] == 4.0 and m["hits"] == 0.5 and seen == [4]  # one call, 4 rows
    assert lower_is_better("max_error", {"max_error": max_error})
    assert not lower_is_better("hits", {"hits": Metric(max_error, higher_is_better=True)})
    with pytest.raises(ConfigError, match="metric 'rmse' is built in for regression tasks"):
        Evaluator(nn.Linear(1, 1), F.mse_loss, kind="regression", metrics={"rmse": max_error})


def test_worst_client_and_tail_follow_the_metric_direction() -> None:
    errors = [3.0, 9.0, 1.0, 5.0, 7.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    low = distribution_summary(errors, lower_is_better=True)
    assert low == {"worst": 10.0, "p90": pytest.approx(9.1), "median": 5.5, "best": 1.0}
    high = distribution_summary(errors)
    assert high == {"worst": 1.0, "p10": pytest.approx(1.9), "median": 5.5, "best": 10.0}
    assert tail_key("rmse", True) == "rmse_p90" and tail_key("accuracy", False) == "accuracy_p10"


def _fake_ctx(per_client: dict[str, dict[str, float]]) -> SimpleNamespace:
    def request(requests, timeout):
        return [SimpleNamespace(src=r.dst, error=None, metrics=per_client[r.dst])
                for r in requests]
    transport = SimpleNamespace(nodes=lambda: list(per_client), request=request)
    return SimpleNamespace(transport=transport, params=lambda: {}, round=1)


def test_federated_evaluation_reports_the_highest_error_as_worst() -> None:
    clients = {"a": {"rmse": 2.0, "mse": 4.0, "examples": 10.0},
               "b": {"rmse": 4.0, "mse": 16.0, "examples": 30.0},
               "c": {"rmse": 1.0, "mse": 1.0, "examples": 10.0}}
    out = FederatedEvaluation(metric="rmse").evaluate(_fake_ctx(clients))
    assert out["fed_eval/rmse_worst"] == 4.0
    assert out["fed_eval/rmse_p90"] == pytest.approx(3.6)
    assert "fed_eval/rmse_p10" not in out
    assert out["fed_eval/rmse"] == pytest.approx(math.sqrt((40 + 480 + 10) / 50))  # pooled
    acc = {k: {"accuracy": v, "examples": 1.0} for k, v in (("a", 0.9), ("b", 0.5), ("c", 0.7))}
    out = FederatedEvaluation(metric="accuracy").evaluate(_fake_ctx(acc))
    assert out["fed_eval/accuracy_worst"] == 0.5
    assert out["fed_eval/accuracy_p10"] == pytest.approx(0.54)
