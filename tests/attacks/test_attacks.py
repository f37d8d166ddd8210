"""Attacks: each attacker's reply against a hand-computed oracle, and what they do to FedAvg
with and without robust aggregation (orderings, not tight numbers)."""

from __future__ import annotations

import copy
import math
from statistics import NormalDist

import pytest
import torch

from shoal import tree
from shoal.aggregate import Pipeline, clip_by_norm, coordinate_median, trimmed_mean
from shoal.algorithms.fedavg import FedAvg
from shoal.attacks import (
    Malicious,
    Trigger,
    alie,
    alie_z,
    backdoor,
    backdoor_success,
    choose_attackers,
    free_rider,
    gaussian,
    ipm,
    label_flip,
    poison,
    scaled,
    sign_flip,
)
from shoal.client import local_sgd
from shoal.data.arrays import ArrayData
from shoal.errors import ConfigError
from shoal.run import run
from shoal.seeding import derive_seed
from shoal.sim import InProcessTransport
from shoal.types import ClientInfo

from ..conftest import cross_entropy, make_tiny, sgd

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ten():
    return make_tiny(clients=10, per_client=30)


def honest_of(t):
    return local_sgd(t.model(), cross_entropy, batch_size=5, optimizer=sgd(0.1))


def info(cid: str, round: int = 1) -> ClientInfo:
    return ClientInfo(cid, round, derive_seed(0, "client", round, cid))


def accuracy(model, params, data: ArrayData) -> float:
    m = copy.deepcopy(model)
    tree.load_params_(m, params)
    x, y = data.tensors()
    with torch.no_grad():
        return float((m(x).argmax(-1) == y).float().mean())


def train(t, update, pipeline=None, rounds=4, executor=None):
    fedavg = FedAvg(update, pipeline=pipeline, seed=1)
    transport = InProcessTransport(t.ids, t.data.__getitem__, fedavg.handlers(),
                                   executor=executor)
    return run(fedavg, transport, rounds=rounds, params=tree.params_of(t.model())).state.params


def test_benign_clients_get_the_honest_update_bit_identical(ten):
    honest = honest_of(ten)
    params = tree.params_of(ten.model())
    m = Malicious(honest, sign_flip(), ["client-3"])
    for cid in ("client-0", "client-5"):
        a = m(params, ten.data[cid].train, info(cid))
        b = honest(params, ten.data[cid].train, info(cid))
        assert tree.equal(a.update, b.update) and a.weight == b.weight and a.metrics == b.metrics
    assert "sign_flip(1)" in repr(m) and "'client-3'" in repr(m)


def test_label_flip_trains_exactly_as_honest_sgd_on_flipped_labels(ten):
    honest = honest_of(ten)
    params = tree.params_of(ten.model())
    data = ten.data["client-2"].train
    y_before = ten.y.clone()
    got = Malicious(honest, label_flip(3), ["client-2"])(params, data, info("client-2"))
    assert torch.equal(ten.y, y_before)  # the pool is untouched
    flipped = ArrayData(data.x, 2 - data.y, data.index)  # by hand: the whole pool flipped
    want = honest_of(ten)(params, flipped, info("client-2"))
    assert tree.equal(got.update, want.update) and got.weight == want.weight


def test_sign_flip_scaled_free_rider_and_gaussian(ten):
    honest = honest_of(ten)
    params = tree.params_of(ten.model())
    data = ten.data["client-1"].train
    i = info("client-1")
    ref = honest(params, data, i)

    def send(attack):
        return Malicious(honest, attack, ["client-1"])(params, data, i)

    flip = send(sign_flip())
    assert all(torch.equal(flip.update[k], -ref.update[k]) for k in ref.update)
    assert flip.weight == ref.weight
    s = send(scaled(3.0))
    assert all(torch.equal(s.update[k], 3.0 * ref.update[k]) for k in ref.update)
    free = send(free_rider())
    assert all(not v.any() for v in free.update.values()) and free.weight == ref.weight
    g = send(gaussian(0.5))
    assert {k: v.shape for k, v in g.update.items()} == {k: v.shape for k, v in ref.update.items()}
    flat = tree.flatten(g.update)[0]
    assert abs(float(flat.std()) - 0.5) < 0.1 and abs(float(flat.mean())) < 0.1
    assert tree.equal(g.update, send(gaussian(0.5)).update)  # from info.seed


def test_free_rider_mimic_sends_the_last_global_change():
    fr = free_rider(mimic=True)
    data = ArrayData.of(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    p1, p2 = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.5, 1.0])}
    first = fr.attack(None, p1, data, info("a"), None)  # type: ignore[arg-type]
    second = fr.attack(None, p2, data, info("a", 2), None)  # type: ignore[arg-type]
    assert torch.equal(first.update["w"], torch.zeros(2))
    assert torch.equal(second.update["w"], torch.tensor([0.5, -1.0])) and second.weight == 4.0


def _colluders_by_hand(t, honest, params, attackers, seed, round):
    return [honest(params, t.data[c].train,
                   ClientInfo(c, round, derive_seed(seed, "colluder", round, c))).update
            for c in attackers]


def test_alie_sends_mean_minus_z_std_of_the_colluders_honest_updates(ten):
    honest = honest_of(ten)
    params = tree.params_of(ten.model())
    attackers = ["client-1", "client-4", "client-7"]
    m = Malicious(honest, alie(num_clients=10), attackers, data_fn=ten.data.__getitem__, seed=5)
    z = NormalDist().inv_cdf((10 - (math.floor(10 / 2 + 1) - 3)) / 10)  # s = 3, Phi^-1(0.7)
    assert alie_z(10, 3) == z and abs(z - 0.5244) < 1e-4
    ups = _colluders_by_hand(ten, honest_of(ten), params, attackers, 5, 2)
    sent = [m(params, ten.data[c].train, info(c, 2)) for c in reversed(attackers)]
    for k in params:
        s = torch.stack([u[k] for u in ups])
        mean = s.mean(0)
        std = ((s - mean) ** 2).mean(0).sqrt()
        for r in sent:
            torch.testing.assert_close(r.update[k], mean - z * std, rtol=1e-6, atol=1e-7)
    assert all(r.weight == 25.0 for r in sent)
    # An explicit z, and FedAvg runs with it (the sequential executor).
    fixed = Malicious(honest, alie(z=1.5), attackers, data_fn=ten.data.__getitem__)
    assert tree.is_finite(train(ten, fixed, rounds=1))


def test_ipm_sends_minus_epsilon_mean(ten):
    honest = honest_of(ten)
    params = tree.params_of(ten.model())
    attackers = ["client-0", "client-9"]
    m = Malicious(honest, ipm(0.5), attackers, data_fn=ten.data.__getitem__, seed=2)
    ups = _colluders_by_hand(ten, honest_of(ten), params, attackers, 2, 1)
    for c in attackers:
        r = m(params, ten.data[c].train, info(c))
        for k in params:
            torch.testing.assert_close(r.update[k], -0.5 * (ups[0][k] + ups[1][k]) / 2,
                                       rtol=1e-6, atol=1e-7)


def test_collusive_attacks_need_data_fn_and_their_own_process(ten):
    honest = honest_of(ten)
    with pytest.raises(ConfigError, match="data_fn"):
        Malicious(honest, ipm(1.0), ["client-0"])
    with pytest.raises(ConfigError, match="z_max"):
        alie()
    m = Malicious(honest, ipm(1.0), ["client-0"], data_fn=ten.data.__getitem__)
    m._pid = -1  # as if unpickled in a worker process
    with pytest.raises(ConfigError, match="sequential"):
        m(tree.params_of(ten.model()), ten.data["client-0"].train, info("client-0"))


def test_choose_attackers_is_deterministic_and_respects_the_fraction():
    ids = [f"c{i}" for i in range(10)]
    a = choose_attackers(ids, 0.2, seed=3)
    assert a == choose_attackers(ids, 0.2, seed=3) and len(a) == 2
    assert a == [c for c in ids if c in a]  # in the clients' order
    assert len(choose_attackers(ids, 0.01, seed=3)) == 1  # at least one when > 0
    assert choose_attackers(ids, 0.0, seed=3) == [] and len(choose_attackers(ids, 0.35, 3)) == 3
    assert len(choose_attackers(ids, 4, seed=3)) == 4
    assert len({tuple(choose_attackers(ids, 0.3, seed=s)) for s in range(10)}) > 1
    with pytest.raises(ConfigError):
        choose_attackers(ids, 1.5, seed=0)


def test_sign_flipping_a_fifth_drags_fedavg_down_but_not_median_or_trimmed_mean(ten):
    honest = honest_of(ten)
    attackers = choose_attackers(ten.ids, 0.2, seed=3)
    evil = Malicious(honest, sign_flip(5.0), attackers)
    model = ten.model()
    acc = {
        "clean": accuracy(model, train(ten, honest), ten.test),
        "mean": accuracy(model, train(ten, evil), ten.test),
        # the vectorized executor runs the non-Batchable wrapper one by one
        "median": accuracy(model, train(ten, evil, Pipeline([], coordinate_median()),
                                         executor="vectorized"), ten.test),
        "trimmed": accuracy(model, train(ten, evil, Pipeline([], trimmed_mean(0.2))), ten.test),
    }
    assert acc["mean"] < 0.6 < 0.9 < min(acc["clean"], acc["median"], acc["trimmed"])


def test_boosted_backdoor_succeeds_against_fedavg_not_median_or_clipping(ten):
    honest = honest_of(ten)
    trigger = Trigger.at_features([0, 1], 6.0)
    evil = Malicious(honest, backdoor(trigger, target=0, boost=10.0), ["client-3"])
    model = ten.model()

    def outcome(update, pipeline=None):
        p = train(ten, update, pipeline)
        return (backdoor_success(model, p, ten.test, trigger, 0), accuracy(model, p, ten.test))

    got = {"clean": outcome(honest), "mean": outcome(evil),
           "median": outcome(evil, Pipeline([], coordinate_median())),
           "clip": outcome(evil, Pipeline([clip_by_norm(1.0, "coordinator")]))}
    success = {k: v[0] for k, v in got.items()}
    assert success["mean"] > 0.7
    assert max(success["clean"], success["median"], success["clip"]) < 0.3
    assert got["mean"][1] > 0.85  # the main task still works: the backdoor is stealthy


def test_triggers_and_poisoned_data():
    img = torch.zeros(2, 1, 6, 6)
    out = Trigger.pixels(2, 1.0).apply(img)
    assert not img.any() and out[:, :, 4:, 4:].eq(1).all() and out.sum() == 2 * 4
    flat = torch.zeros(3, 5)
    assert Trigger.at_features([1, 3], 2.0).apply(flat)[:, [1, 3]].eq(2).all()
    data = ArrayData(torch.arange(10.0).reshape(5, 2), torch.tensor([0, 1, 2, 1, 0]),
                     torch.tensor([1, 3]))
    p = poison(data, Trigger.at_features([0], -1.0), target=2)
    x, y = p.tensors()
    assert torch.equal(y, torch.tensor([1, 1, 2, 2])) and torch.equal(x[2:, 0], torch.tensor(
        [-1.0, -1.0])) and torch.equal(x[:2], data.tensors()[0])

    def predict(params, x):  # class 2 whenever feature 0 is negative
        return torch.stack([x[:, 1], torch.zeros(len(x)), -x[:, 0] * 10], dim=1)

    # labels != target: rows 0, 1, 3, 4; triggered, all predicted 2
    full = ArrayData.of(torch.arange(10.0).reshape(5, 2), torch.tensor([0, 1, 2, 1, 0]))
    assert backdoor_success(predict, {}, full, Trigger.at_features([0], -1.0), 2) == 1.0
    assert backdoor_success(predict, {}, full, Trigger.at_features([0], 1.0), 2) == 0.0
