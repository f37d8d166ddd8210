"""Linear layers that take their SGD step inside the backward pass (shoal.batched.fused): the same
training as autograd's gradients followed by the step, within float rounding."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from shoal import tree
from shoal.batched.fused import SGDStep, SteppedLinear, _LinearFunction, step_linear_layers
from shoal.batched.local_sgd import VectorizedLocalSGD
from shoal.client import local_sgd
from shoal.data.arrays import ArrayData
from shoal.types import ClientInfo

from ..conftest import cross_entropy


class SeqHead(nn.Module):
    """A linear layer applied at every position of a sequence ((B, T, F) inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 5)
        self.out = nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 8) -> (B, 3, T=4)
        h = torch.tanh(self.proj(x.view(len(x), 4, 2)))  # (B, 4, 5)
        return self.out(h).transpose(1, 2)


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(12, 3))
    frozen = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    frozen[0].weight.requires_grad_(False)
    return {"mlp": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
            "conv+linear": conv, "frozen-weight": frozen, "sequence": SeqHead()}


def targets(name: str, y: torch.Tensor) -> torch.Tensor:
    return y.unsqueeze(1).expand(-1, 4).contiguous() if name == "sequence" else y


OPTS = {
    "plain": ({"optimizer": functools.partial(torch.optim.SGD, lr=0.1)}),
    "momentum-wd": ({"optimizer": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9,
                                                      weight_decay=1e-2), "epochs": 2}),
    "prox-maxsteps": ({"optimizer": functools.partial(torch.optim.SGD, lr=0.1), "prox_mu": 0.5,
                       "max_steps": 3}),
    "prox-momentum": ({"optimizer": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.5),
                       "prox_mu": 0.3}),
}


@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("name", list(models()))
def test_fused_linear_steps_equal_autograd_then_step(name: str, opt: str) -> None:
    model = models()[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g)
    y = targets(name, torch.randint(0, 3, (60,), generator=g))
    sizes = [13, 3, 9, 7]  # unequal: padded, masked last batches and a shrinking cohort
    starts = [0, 13, 16, 25]
    datas = [ArrayData(x, y, torch.arange(s, s + n)) for s, n in zip(starts, sizes, strict=True)]
    infos = [ClientInfo(f"c{i}", 1, 100 + i) for i in range(len(datas))]
    update = local_sgd(model, cross_entropy, batch_size=4, **OPTS[opt])
    params = tree.params_of(model)
    # Eager steps: what this compares is the arithmetic (tests/test_traced.py: the replay).
    fused = VectorizedLocalSGD(update, fuse_min_weights=0, trace=False)
    plain = VectorizedLocalSGD(update, fuse_min_weights=None, trace=False)
    assert fused.fused and not plain.fused
    for _ in range(2):  # the second call reuses the learned layouts
        a, b = fused(params, datas, infos), plain(params, datas, infos)
        for ra, rb in zip(a, b, strict=True):
            for k in params:
                torch.testing.assert_close(ra.update[k], rb.update[k], rtol=1e-5, atol=1e-6)
            assert ra.metrics["train/loss"] == pytest.approx(rb.metrics["train/loss"], rel=1e-5)
            assert ra.metrics["train/steps"] == rb.metrics["train/steps"]


def test_only_plain_linear_layers_whose_params_all_train_are_fused() -> None:
    ms = models()
    step = SGDStep(0.1)
    frozen = ms["frozen-weight"]
    trainable = [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert step_linear_layers(frozen, trainable, step, min_weights=0) == ["2.weight", "2.bias"]
    assert type(frozen[0]) is nn.Linear and isinstance(frozen[2], SteppedLinear)

    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2))
    tied[2].weight = tied[0].weight  # tied weights get gradients from two layers
    names = [n for n, _ in tied.named_parameters()]
    assert step_linear_layers(tied, names, step, min_weights=0) == ["3.weight", "3.bias"]
    small = ms["mlp"]  # 8x16 and 16x3 weights: below the default size, nothing is fused
    assert step_linear_layers(small, [n for n, _ in small.named_parameters()], step) == []
    assert step_linear_layers(small, [n for n, _ in small.named_parameters()], step,
                              min_weights=128) == ["0.weight", "0.bias"]


def test_stepped_linear_outside_vmap_is_an_ordinary_linear_layer() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    ref = nn.Linear(5, 3).double()
    ref.load_state_dict(lin.state_dict())
    layer = SteppedLinear(lin, "weight", "bias")
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), ref(x))
    torch.autograd.gradcheck(lambda x, w, b: _LinearFunction.apply(x, w, b, layer),
                             (x, lin.weight, lin.bias))
    layer(x).square().sum().backward()
    gx, gw, gb = x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()
    x.grad = None
    ref(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, ref.weight.grad)
    torch.testing.assert_close(gb, ref.bias.grad)


@pytest.mark.parametrize("name", ["mlp", "sequence"])
def test_cross_entropy_taken_outside_vmap_equals_the_per_client_loss(name: str) -> None:
    model = models()[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 8, generator=g)
    y = targets(name, torch.randint(0, 3, (60,), generator=g))
    datas = [ArrayData(x, y, torch.arange(s, s + n)) for s, n in ((0, 13), (13, 3), (16, 8))]
    infos = [ClientInfo(f"c{i}", 1, 7 + i) for i in range(3)]
    params = tree.params_of(model)
    kw = {"batch_size": 4, "optimizer": functools.partial(torch.optim.SGD, lr=0.1)}
    fast = VectorizedLocalSGD(local_sgd(model, torch.nn.functional.cross_entropy, **kw))
    generic = VectorizedLocalSGD(local_sgd(
        model, lambda o, t: torch.nn.functional.cross_entropy(o, t), **kw))
    assert fast._cross_entropy_outside(y) and not generic._cross_entropy_outside(y)
    for ra, rb in zip(fast(params, datas, infos), generic(params, datas, infos), strict=True):
        for k in params:
            torch.testing.assert_close(ra.update[k], rb.update[k], rtol=1e-5, atol=1e-6)
        assert ra.metrics["train/loss"] == pytest.approx(rb.metrics["train/loss"], rel=1e-5)
    # A target equal to ignore_index (-100) is left out of cross_entropy's mean: such pools
    # keep the per-client loss under vmap.
    y_ignored = y.clone()
    y_ignored[5] = -100
    assert not fast._cross_entropy_outside(y_ignored)
