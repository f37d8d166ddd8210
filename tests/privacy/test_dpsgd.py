"""DP-SGD client update: per-sample clipping against torch.func, noise statistics, Poisson
sampling, determinism, the BatchNorm refusal."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shoal import tree
from shoal.data.arrays import ArrayData
from shoal.errors import ConfigError, ModelError
from shoal.privacy import check_dp_model, dp_sgd, tramer_boneh_cnn
from shoal.privacy.accounting import gaussian_event
from shoal.types import ClientInfo


def _data(n: int = 16, seed: int = 0) -> ArrayData:
    g = torch.Generator().manual_seed(seed)
    return ArrayData.of(torch.randn(n, 5, generator=g) * 3, torch.randint(0, 3, (n,), generator=g))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _per_sample_clipped_mean(model: nn.Module, data: ArrayData, clip: float) -> dict:
    """The oracle: per-example gradients by torch.func, each clipped to ``clip``, summed and
    divided by the batch size."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = data.tensors()

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))  # (n,)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) / len(x)
            for k, g in grads.items()}


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_one_full_batch_step_is_the_clipped_mean_gradient(mode):
    """With q = 1 (batch >= data), one step and negligible noise, the update is -lr times the
    mean of the per-example gradients, each clipped to C."""
    torch.set_num_threads(1)
    model, data, clip, lr = _model(), _data(), 0.5, 1.0
    update_fn = dp_sgd(model, F.cross_entropy, noise_multiplier=1e-9, max_grad_norm=clip,
                       batch_size=len(data), max_steps=1, grad_sample_mode=mode,
                       optimizer=functools.partial(torch.optim.SGD, lr=lr))
    result = update_fn(tree.params_of(model), data, ClientInfo("c", 1, 7))
    expected = _per_sample_clipped_mean(model, data, clip)
    for k, g in expected.items():
        torch.testing.assert_close(result.update[k], -lr * g, rtol=1e-4, atol=1e-6)
    assert result.metrics["train/steps"] == 1.0
    assert result.metrics["dp/sampling_rate"] == 1.0


def test_bookkeeping_equals_hooks_on_a_cnn():
    """Book-keeping (one backward pass) gives Opacus' per-example clipping on convolutions and
    linear layers alike, noise included (same seed, same noise)."""
    torch.manual_seed(0)
    model = tramer_boneh_cnn()
    g = torch.Generator().manual_seed(0)
    data = ArrayData.of(torch.randn(48, 1, 28, 28, generator=g),
                        torch.randint(0, 10, (48,), generator=g))
    _bookkeeping_and_hooks(model, data, noise_multiplier=0.7, max_grad_norm=0.05,
                           batch_size=16, max_steps=3)


def _bookkeeping_and_hooks(model, data, **dp) -> dict[str, dict]:
    """The updates of book-keeping and of Opacus' hooks mode (the same noise: reproducible),
    checked equal; returned by mode."""
    params = tree.params_of(model)
    results = {}
    for mode in ("bookkeeping", "hooks"):
        update_fn = dp_sgd(model, F.cross_entropy, grad_sample_mode=mode, reproducible=True,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.5), **dp)
        results[mode] = update_fn(params, data, ClientInfo("c", 2, 9)).update
    for k in params:
        torch.testing.assert_close(results["bookkeeping"][k], results["hooks"][k],
                                   rtol=1e-4, atol=1e-6)
    return results


@pytest.mark.parametrize("conv", [
    dict(), dict(stride=2), dict(padding=2, dilation=2), dict(groups=2),
    dict(stride=(2, 1), padding=(1, 0), groups=4, bias=False), dict(kernel_size=(3, 2), stride=3),
])
def test_conv_per_example_gradients_match_opacus(conv):
    """Book-keeping's Conv2d sampler (the weight-gradient kernel over B x groups) gives
    Opacus' im2col per-example gradients for strides, dilations, groups and odd kernels."""
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from shoal.privacy.bookkeeping import _conv2d_grad_sample
    torch.manual_seed(0)
    conv = {"kernel_size": 3, **conv}
    layer = nn.Conv2d(8, 12, **conv)
    x = torch.randn(5, 8, 17, 15)
    g = torch.randn_like(layer(x))
    ours, opacus = _conv2d_grad_sample(layer, [x], g), compute_conv_grad_sample(layer, [x], g)
    assert set(ours) == set(opacus)
    for p in opacus:
        torch.testing.assert_close(ours[p], opacus[p], rtol=1e-4, atol=1e-4)


class _EmbeddingBag(nn.Module):
    """Integer inputs: the first trainable layer sees data that needs no gradient."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.out = nn.Linear(6, 10, bias=False)

    def forward(self, x):
        return self.out(self.emb(x).mean(1))


@pytest.mark.parametrize("kind", ["no-bias-first", "frozen-first", "embedding"])
def test_bookkeeping_backward_reaches_every_layer(kind):
    """Book-keeping asks autograd only for the entry layers' smallest parameters; every layer's
    clipped gradient must still equal Opacus' per-example clipping — a first layer without a
    bias, a frozen first layer, integer inputs through an embedding."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "embedding":
        model = _EmbeddingBag()
        data = ArrayData.of(torch.randint(0, 20, (32, 5), generator=g),
                            torch.randint(0, 10, (32,), generator=g))
    else:
        model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 6 * 6, 10))
        if kind == "frozen-first":
            model[0].weight.requires_grad_(False)
        data = ArrayData.of(torch.randn(32, 1, 8, 8, generator=g),
                            torch.randint(0, 10, (32,), generator=g))
    results = _bookkeeping_and_hooks(model, data, noise_multiplier=0.5, max_grad_norm=0.1,
                                     batch_size=8, max_steps=2)
    assert any(u.abs().sum() > 0 for u in results["bookkeeping"].values())


def test_noise_has_the_calibrated_standard_deviation():
    """A loss with zero gradient leaves only the noise: N(0, (σC/B)²) per coordinate."""
    def zero_loss(out, target, reduction="mean"):
        per = (out * 0).sum(1)
        return per.mean() if reduction == "mean" else per

    model = nn.Sequential(nn.Linear(5, 400))  # 2,400 coordinates
    data = _data(n=40)
    sigma, clip, batch = 2.0, 0.5, 8
    update_fn = dp_sgd(model, zero_loss, noise_multiplier=sigma, max_grad_norm=clip,
                       batch_size=batch, max_steps=1,
                       optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    result = update_fn(tree.params_of(model), data, ClientInfo("c", 1, 3))
    flat, _ = tree.flatten(result.update)
    expected = sigma * clip / batch
    assert flat.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(flat.mean().item()) < 4 * expected / math.sqrt(flat.numel())


def test_poisson_batches_have_the_expected_size_and_are_secret_unless_reproducible():
    model, data = _model(), _data(n=200)
    params = tree.params_of(model)
    secret = dp_sgd(model, F.cross_entropy, noise_multiplier=1.0, max_grad_norm=1.0,
                    batch_size=20, epochs=3)
    s1 = secret(params, data, ClientInfo("c", 1, 11))
    s2 = secret(params, data, ClientInfo("c", 1, 11))
    assert not all(torch.equal(s1.update[k], s2.update[k]) for k in params)  # same seed: secret
    update_fn = dp_sgd(model, F.cross_entropy, noise_multiplier=1.0, max_grad_norm=1.0,
                       batch_size=20, epochs=3, reproducible=True)
    a = update_fn(params, data, ClientInfo("c", 1, 11))
    b = update_fn(params, data, ClientInfo("c", 1, 11))
    c = update_fn(params, data, ClientInfo("c", 1, 12))
    assert all(torch.equal(a.update[k], b.update[k]) for k in params)  # same seed: same update
    assert not all(torch.equal(a.update[k], c.update[k]) for k in params)
    assert a.metrics["train/steps"] == 30  # ceil(epochs / q) with q = 20 / 200
    # 30 Poisson(q=0.1) samples of 200: mean 600 examples, sd ~16.4.
    assert abs(a.metrics["train/examples"] - 600) < 5 * math.sqrt(600 * 0.9)
    assert a.weight == 200.0


def test_round_event_is_steps_of_poisson_sampled_gaussian():
    update_fn = dp_sgd(_model(), F.cross_entropy, noise_multiplier=1.3, max_grad_norm=1.0,
                       batch_size=10, epochs=2)
    assert update_fn.sampling_rate(50) == 0.2
    assert update_fn.steps(50) == 10
    assert update_fn.event(50) == gaussian_event(1.3, 0.2, 10)


def test_empty_poisson_batches_still_add_noise():
    model = _model()
    data = _data(n=3)
    update_fn = dp_sgd(model, F.cross_entropy, noise_multiplier=1.0, max_grad_norm=1.0,
                       batch_size=1, epochs=1)
    result = update_fn(tree.params_of(model), data, ClientInfo("c", 1, 5))
    assert result.metrics["train/steps"] == 3.0
    assert tree.norm(result.update) > 0 and tree.is_finite(result.update)


def test_batchnorm_is_refused_with_reason_and_fix():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(ModelError) as e:
        dp_sgd(model, F.cross_entropy, noise_multiplier=1.0, max_grad_norm=1.0)
    assert str(e.value) == (
        "dp_sgd: the model has BatchNorm layers ('1' (BatchNorm2d)), which DP-SGD cannot train: "
        "BatchNorm normalises each example with statistics of the whole batch, so one "
        "example's gradient depends on the others and per-sample clipping no longer bounds "
        "its influence. Replace each BatchNorm with GroupNorm (e.g. nn.GroupNorm(min(32, C), "
        "C) for C channels; opacus.validators.ModuleValidator.fix(model) does it for you).")
    fixed = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(8, 8), nn.ReLU())
    check_dp_model(fixed)  # the suggested fix is accepted


def test_tramer_boneh_cnn_has_26k_parameters_and_passes_the_check():
    model = tramer_boneh_cnn()
    assert sum(p.numel() for p in model.parameters()) == 26_010
    check_dp_model(model)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match=r"dp_sgd: max_grad_norm must be > 0 \(got 0\)"):
        dp_sgd(_model(), F.cross_entropy, noise_multiplier=1.0, max_grad_norm=0)
    with pytest.raises(ConfigError, match="grad_sample_mode must be 'bookkeeping', 'ghost' or 'hooks'"):
        dp_sgd(_model(), F.cross_entropy, noise_multiplier=1.0, max_grad_norm=1.0,
               grad_sample_mode="ew")  # type: ignore[arg-type]
