"""local_sgd: steps, examples, optimizers, errors that name the client, round and step."""

from __future__ import annotations

import functools

import pytest
import torch

from shoal import tree
from shoal.client import local_sgd, optimizer_fn
from shoal.data.arrays import ArrayData
from shoal.errors import ClientError, ConfigError
from shoal.types import ClientInfo

from .conftest import cross_entropy, sgd


def test_epochs_batches_and_max_steps(tiny):
    model = tiny.model()
    data = tiny.data["client-0"].train  # 25 examples
    info = ClientInfo("client-0", 1, 123)
    r = local_sgd(model, cross_entropy, epochs=2, batch_size=10, optimizer=sgd(0.1))(
        tree.params_of(model), data, info)
    assert r.metrics["train/steps"] == 6 and r.metrics["train/examples"] == 50
    assert r.weight == 25
    r = local_sgd(model, cross_entropy, epochs=2, batch_size=10, max_steps=4,
                  optimizer=sgd(0.1))(tree.params_of(model), data, info)
    assert r.metrics["train/steps"] == 4


def test_same_seed_same_update_and_model_is_untouched(tiny):
    model = tiny.model()
    before = tree.params_of(model)
    update = local_sgd(model, cross_entropy, batch_size=4, optimizer=sgd(0.1))
    data = tiny.data["client-1"].train
    a = update(before, data, ClientInfo("c", 1, 5)).update
    b = update(before, data, ClientInfo("c", 1, 5)).update
    c = update(before, data, ClientInfo("c", 1, 6)).update
    assert tree.equal(a, b) and not tree.equal(a, c)
    assert tree.equal(tree.params_of(model), before)


def test_any_torch_optimizer(tiny):
    model = tiny.model()
    opt = optimizer_fn("Adam", lr=1e-2)
    r = local_sgd(model, cross_entropy, optimizer=opt)(
        tree.params_of(model), tiny.data["client-0"].train, ClientInfo("c", 1, 0))
    assert tree.norm(r.update) > 0


def test_optimizer_fn_errors():
    with pytest.raises(ConfigError, match=r"optimizer: unknown torch optimizer 'Adamm'; "
                                          r"expected one of .*Adam.*SGD"):
        optimizer_fn("Adamm", lr=0.1)
    with pytest.raises(ConfigError, match=r"optimizer: torch.optim.SGD rejected \{'lr': -1\}"):
        optimizer_fn("SGD", lr=-1)


def test_error_inside_client_names_client_round_and_step():
    model = torch.nn.Linear(3, 2)

    class Bomb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("kaboom")
            return self.lin(x)

    data = ArrayData.of(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    update = local_sgd(Bomb(), cross_entropy, batch_size=2, optimizer=sgd(0.1))
    with pytest.raises(ClientError) as e:
        update(tree.params_of(Bomb()), data, ClientInfo("hospital-7", 12, 0))
    assert str(e.value) == ("client 'hospital-7' failed in round 12 at local step 2: "
                            "RuntimeError: kaboom")
    assert (e.value.client, e.value.round, e.value.step) == ("hospital-7", 12, 2)
    assert isinstance(e.value.__cause__, RuntimeError)
    del model


@pytest.mark.parametrize("kwargs, msg", [
    ({"epochs": 0}, "local_sgd: epochs must be >= 1 (got 0)."),
    ({"batch_size": 0}, "local_sgd: batch_size must be >= 1 (got 0)."),
    ({"prox_mu": -1}, "local_sgd: prox_mu must be >= 0 (got -1)."),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ConfigError) as e:
        local_sgd(torch.nn.Linear(1, 1), cross_entropy, **kwargs)
    assert str(e.value) == msg


def test_repr_is_readable():
    u = local_sgd(torch.nn.Linear(1, 1), cross_entropy, batch_size=16,
                  optimizer=functools.partial(torch.optim.SGD, lr=0.05), prox_mu=0.01)
    assert repr(u) == "local_sgd(epochs=1, batch_size=16, optimizer=SGD(lr=0.05), prox_mu=0.01)"


def test_explicit_device_trains_there_and_returns_the_update_beside_the_params(tiny):
    model = tiny.model()
    params = tree.params_of(model)
    info = ClientInfo("client-0", 1, 7)
    data = tiny.data["client-0"].train
    base = local_sgd(model, cross_entropy, epochs=2, batch_size=8, optimizer=sgd(0.1))
    placed = local_sgd(model, cross_entropy, epochs=2, batch_size=8, optimizer=sgd(0.1),
                       device="cpu")
    assert "device='cpu'" in repr(placed) and placed.device == torch.device("cpu")
    a, b = base(params, data, info), placed(params, data, info)
    assert tree.equal(a.update, b.update) and a.metrics == b.metrics
    assert all(v.device == params[k].device for k, v in b.update.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_gpu_matches_cpu_within_float_tolerance(tiny):
    model = tiny.model()
    params = tree.params_of(model)
    info = ClientInfo("client-0", 1, 7)
    data = tiny.data["client-0"].train
    cpu = local_sgd(model, cross_entropy, epochs=2, batch_size=8, optimizer=sgd(0.1))
    gpu = local_sgd(model, cross_entropy, epochs=2, batch_size=8, optimizer=sgd(0.1),
                    device="cuda")
    a, b = cpu(params, data, info), gpu(params, data, info)
    assert all(b.update[k].device.type == "cpu" for k in params)
    for k in params:
        torch.testing.assert_close(b.update[k], a.update[k], rtol=1e-4, atol=1e-5)
