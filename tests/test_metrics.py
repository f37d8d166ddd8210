"""Evaluator: loss weighting, accuracy for classes and for sequences, AUC."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shoal.data.arrays import ArrayData
from shoal.metrics import Evaluator


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
