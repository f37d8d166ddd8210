"""Gradient inversion: a batch-1 gradient (or one-step SGD update) gives its input away exactly
through a fully connected first layer, and to an optimisation attack; batching and DP noise
stop both."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shoal import tree
from shoal.audits import inversion
from shoal.audits.inversion import (
    analytic_recovery,
    exact_recovery,
    infer_label,
    invert_gradients,
    reconstruction_error,
    update_to_gradient,
)
from shoal.client import local_sgd
from shoal.data.arrays import ArrayData
from shoal.types import ClientInfo

pytestmark = pytest.mark.usefixtures("one_thread")


def relu_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def sigmoid_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 3))


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(named.values()))
    return dict(zip(named, grads, strict=True))


def dp_noise(grads: dict[str, torch.Tensor], clip: float, sigma: float, seed: int,
             ) -> dict[str, torch.Tensor]:
    """DP-SGD on one example: clip to ``clip`` and add N(0, (sigma * clip)^2) per coordinate."""
    factor = min(1.0, clip / tree.norm(grads))
    gen = torch.Generator().manual_seed(seed)
    return {k: v * factor + torch.randn(v.shape, generator=gen) * sigma * clip
            for k, v in grads.items()}


def test_analytic_recovery_is_exact_from_a_batch1_gradient():
    model = relu_mlp()
    gen = torch.Generator().manual_seed(1)
    for i in range(5):
        x = torch.randn(1, 8, generator=gen)
        grads = gradient(model, x, torch.tensor([i % 3]))
        x_hat = analytic_recovery(grads, "0")
        assert x_hat is not None and x_hat.shape == (8,)
        assert exact_recovery(x_hat, x, 1e-5)
        assert reconstruction_error(x_hat, x) < 1e-10
        assert analytic_recovery(grads, "0.weight") is not None  # either name of the layer


def test_analytic_recovery_of_a_flattened_image_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 2))
    x = torch.rand(1, 3, 2, 2)
    x_hat = analytic_recovery(gradient(model, x, torch.tensor([1])), "1")
    assert x_hat is not None
    assert exact_recovery(x_hat.reshape(x.shape), x, 1e-5)


def test_analytic_recovery_from_a_one_step_sgd_update():
    """The coordinator's view: LocalSGD's update after one SGD step on one example."""
    model = relu_mlp()
    params = tree.params_of(model)
    x, y = torch.randn(1, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([2])
    update_fn = local_sgd(relu_mlp(), F.cross_entropy, batch_size=1, max_steps=1,
                          optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    update = update_fn(params, ArrayData.of(x, y), ClientInfo("victim", 1, 7)).update
    grads = update_to_gradient(update, lr=0.1)
    true = gradient(model, x, y)
    for k in true:
        assert torch.allclose(grads[k], true[k], atol=1e-6), k
    x_hat = analytic_recovery(grads, "0")
    assert exact_recovery(x_hat, x, 1e-4)
    # The ratio ignores the gradient's scale: the raw update gives the input too.
    assert exact_recovery(analytic_recovery(update, "0"), x, 1e-4)


def test_update_to_gradient_scales_and_checks():
    u = {"w": torch.tensor([0.2, -0.4])}
    assert torch.allclose(update_to_gradient(u, 0.1)["w"], torch.tensor([-2.0, 4.0]))
    assert torch.allclose(update_to_gradient(u, 0.1, steps=2)["w"], torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError):
        update_to_gradient(u, 0.0)


def test_analytic_recovery_fails_on_a_batch_of_eight():
    model = relu_mlp()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 8, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    x_hat = analytic_recovery(gradient(model, x, y), "0")  # the batch's mean gradient
    if x_hat is not None:
        distances = [(x_hat - x[b]).abs().max().item() for b in range(8)]
        assert min(distances) > 0.1, distances
        assert not any(exact_recovery(x_hat, x[b], 1e-2) for b in range(8))


def test_analytic_recovery_none_without_bias_gradient():
    grads = {"0.weight": torch.ones(4, 3), "0.bias": torch.zeros(4)}
    assert analytic_recovery(grads, "0") is None
    with pytest.raises(KeyError):
        analytic_recovery({"0.weight": torch.ones(4, 3)}, "0")


def test_infer_label_reads_the_last_bias_sign():
    model = sigmoid_mlp()
    gen = torch.Generator().manual_seed(5)
    for label in range(3):
        grads = gradient(model, torch.randn(1, 8, generator=gen), torch.tensor([label]))
        assert infer_label(grads) == label
        no_bias = {k: v for k, v in grads.items() if k != "2.bias"}
        assert infer_label(no_bias) == label  # row sums: sigmoid outputs are positive


def test_invert_gradients_reconstructs_a_batch1_input_and_dp_noise_stops_it():
    model = sigmoid_mlp()
    before = tree.params_of(model)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(1, 8, generator=gen), torch.tensor([1])
    grads = gradient(model, x, y)
    x_hat = invert_gradients(model, F.cross_entropy, grads, (8,), steps=200, lr=0.1, seed=1)
    assert x_hat.shape == (1, 8)
    clean = reconstruction_error(x_hat, x)
    assert clean < 1e-4, clean
    assert exact_recovery(x_hat, x, 0.05)
    assert tree.equal(tree.params_of(model), before)  # the model is untouched

    # DLG's squared distance on the true gradient works as well.
    x_l2 = invert_gradients(model, F.cross_entropy, grads, (8,), steps=200, lr=0.1, seed=1,
                            distance="l2")
    assert reconstruction_error(x_l2, x) < 1e-4

    # DP-SGD on this example: clip to norm 1, noise sigma 1 x clip per coordinate; even with
    # the true label given, the reconstruction is far off.
    noisy = dp_noise(grads, clip=1.0, sigma=1.0, seed=7)
    x_dp = invert_gradients(model, F.cross_entropy, noisy, (8,), label=1, steps=200, lr=0.1,
                            seed=1)
    dp = reconstruction_error(x_dp, x)
    assert dp > 1000 * clean and dp > 0.5, (dp, clean)
    assert not exact_recovery(x_dp, x, 0.05)


def test_exact_recovery_rescale():
    x = torch.tensor([1.0, -2.0, 3.0])
    assert not exact_recovery(2 * x, x, 1e-6)
    assert exact_recovery(2 * x, x, 1e-6, rescale=True)
    assert not exact_recovery(None, x)
    assert reconstruction_error(x + 1, x) == pytest.approx(1.0)


def test_module_lists_its_api():
    assert set(inversion.__all__) >= {"analytic_recovery", "invert_gradients",
                                      "update_to_gradient", "exact_recovery"}


def test_the_coordinator_recovers_each_clients_example_from_what_it_received():
    """End to end: FedAvg with one-example clients taking one SGD step; the coordinator's
    recorded updates give every client's input back exactly."""
    from shoal.algorithms.fedavg import FedAvg
    from shoal.data.federated import ClientData
    from shoal.message import COORDINATOR
    from shoal.observe import Recorder
    from shoal.run import run
    from shoal.sim import InProcessTransport

    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(3, 8, generator=gen), torch.tensor([0, 1, 2])
    ids = [f"client-{i}" for i in range(3)]
    data = {cid: ClientData(ArrayData(x, y, torch.tensor([i])), ArrayData(x, y, torch.tensor([i])))
            for i, cid in enumerate(ids)}
    model = relu_mlp()
    fedavg = FedAvg(local_sgd(model, F.cross_entropy, batch_size=1, max_steps=1,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1)), seed=5)
    with InProcessTransport(ids, data.__getitem__, fedavg.handlers()) as transport:
        coordinator = transport.observe(Recorder(COORDINATOR, kinds={"train"}))
        run(fedavg, transport, rounds=1, params=tree.params_of(model))
    received = coordinator.received
    assert sorted(m.src for m in received) == ids
    for m in received:
        i = ids.index(m.src)
        x_hat = analytic_recovery(update_to_gradient(m.tensors, lr=0.1), "0")
        assert exact_recovery(x_hat, x[i], 1e-4), m.src


def test_invert_gradients_on_an_image_shaped_input_with_tv_and_bounds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Sigmoid(), nn.Linear(12, 2))
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    grads = gradient(model, x, torch.tensor([0]))
    x_hat = invert_gradients(model, F.cross_entropy, grads, (1, 4, 4), steps=150, lr=0.05,
                             tv=1e-4, bounds=(0.0, 1.0), seed=2)
    assert x_hat.shape == (1, 1, 4, 4)
    assert float(x_hat.min()) >= 0.0 and float(x_hat.max()) <= 1.0
    assert reconstruction_error(x_hat, x) < 0.01
    with pytest.raises(ValueError):
        invert_gradients(model, F.cross_entropy, grads, (1, 4, 4), distance="l1")
