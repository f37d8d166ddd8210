"""Protections change only what crosses the cut (messages inspected); leakage measures; bad
input gives errors that name the layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shoal import tree
from shoal.errors import ModelError, UpdateError
from shoal.run import run
from shoal.sim import InProcessTransport
from shoal.split import (
    ActivationNoise,
    GradientNoise,
    NoPeek,
    SplitLearning,
    check_activations,
    cut_model,
    direction_attack_auc,
    distance_correlation,
    norm_attack_auc,
)

from ..conftest import cross_entropy, make_tiny, sgd
from .test_split_training import deep_model


def one_step(protections, seed=7):
    """One batch of one client; every message and reply, and the params after the step."""
    tiny = make_tiny(clients=1, per_client=40)
    model = deep_model()
    params0 = tree.params_of(model)
    split = cut_model(model, "1", input_shape=(8,))
    algo = SplitLearning(split, cross_entropy, batch_size=8, optimizer=sgd(0.1), max_steps=1,
                         protections=protections, seed=seed)
    log: list = []

    def spy(message, context, call):
        reply = call(message, context)
        log.append((message, reply))
        return reply

    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, algo.handlers(),
                                   mods=[spy], on_error="raise")
    state = run(algo, transport, params=params0, rounds=1).state
    by_kind = {m.kind: (m, r) for m, r in log}
    return by_kind, split, algo.params(state)


def test_activation_noise_changes_only_the_activations_sent():
    clean, split, p_clean = one_step([])
    noisy, _, p_noisy = one_step([ActivationNoise(0.5)])
    (_, a_clean), (_, a_noisy) = clean["split.forward"], noisy["split.forward"]
    diff = a_noisy.tensors["activations"] - a_clean.tensors["activations"]
    assert 0.35 < float(diff.std()) < 0.65  # the noise, and nothing else, was added
    assert torch.equal(a_noisy.tensors["labels"], a_clean.tensors["labels"])
    assert tree.equal(clean["split.begin"][0].tensors, noisy["split.begin"][0].tensors)
    assert set(a_noisy.tensors) == set(a_clean.tensors)


def test_gradient_noise_changes_only_the_gradient_returned():
    clean, split, p_clean = one_step([])
    noisy, _, p_noisy = one_step([GradientNoise(1.0)])
    # What the client sends is untouched.
    assert tree.equal(clean["split.forward"][1].tensors, noisy["split.forward"][1].tensors)
    g_clean = clean["split.backward"][0].tensors["grad"]
    g_noisy = noisy["split.backward"][0].tensors["grad"]
    assert not torch.equal(g_clean, g_noisy)
    sigma = float(g_clean.norm(dim=1).max()) / g_clean.shape[1] ** 0.5
    assert 0.5 * sigma < float((g_noisy - g_clean).std()) < 1.5 * sigma
    # The server trained on the true gradient; only the client saw the noisy one.
    assert tree.equal(split.server_params(p_clean), split.server_params(p_noisy))
    assert not tree.equal(split.client_params(p_clean), split.client_params(p_noisy))


def test_nopeek_changes_only_the_clients_objective():
    clean, split, p_clean = one_step([])
    nopeek, _, p_nopeek = one_step([NoPeek(0.5)])
    for kind in ("split.forward", "split.backward"):
        for a, b in zip(clean[kind], nopeek[kind], strict=True):
            assert tree.equal(a.tensors, b.tensors), kind
    assert tree.equal(split.server_params(p_clean), split.server_params(p_nopeek))
    assert not tree.equal(split.client_params(p_clean), split.client_params(p_nopeek))


def test_label_leakage_attacks_and_distance_correlation():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, generator=g) < 0.1).long()
    direction = torch.randn(16, generator=g)
    # Gradients of a binary cross-entropy at the cut: positives large and one way, negatives
    # small and the other way (Li et al. 2021) -> both attacks are perfect.
    grads = torch.where(y[:, None] == 1, 0.9, -0.1) * direction + 0.01 * torch.randn(400, 16,
                                                                                    generator=g)
    assert norm_attack_auc(grads, y) > 0.99
    assert direction_attack_auc(grads, y) > 0.99
    noise = torch.randn(400, 16, generator=g) * 5
    assert abs(norm_attack_auc(grads + noise, y) - 0.5) < 0.15
    x = torch.randn(200, 5, generator=g)
    assert float(distance_correlation(x, x * 3 + 1)) == pytest.approx(1.0, abs=1e-4)
    assert float(distance_correlation(x, torch.randn(200, 4, generator=g))) < 0.3
    # Constant activations (every unit dead): zero, and NoPeek can still back-propagate it.
    z = torch.zeros(10, 4, requires_grad=True)
    d = distance_correlation(x[:10], z)
    d.backward()
    assert float(d.detach()) == 0 and z.grad is not None and not z.grad.any()
    with pytest.raises(ValueError, match="binary labels"):
        norm_attack_auc(grads, y + 1)


def test_leakage_metrics_appear_in_the_round_metrics():
    tiny = make_tiny(clients=2, per_client=40)
    tiny.y.remainder_(2)  # binary labels
    model = deep_model()
    algo = SplitLearning(cut_model(model, "1"), cross_entropy, batch_size=8, optimizer=sgd(0.1))
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, algo.handlers())
    m = run(algo, transport, params=tree.params_of(model), rounds=1).history[-1]
    for key in ("leak/dcor", "leak/label_auc_norm", "leak/label_auc_direction"):
        assert 0 <= m[key] <= 1, key


# -- bad input ------------------------------------------------------------------------------

def test_unknown_cut_name():
    with pytest.raises(ModelError) as e:
        cut_model(deep_model(), "conv")
    assert str(e.value) == (
        "cut_model: the model has no layer 'conv' to cut after (cut). Its layers are "
        "'0' (Linear), '1' (ReLU), '2' (Linear), '3' (Tanh), '4' (Linear).")


def test_models_that_cannot_be_cut_there():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 2)

        def forward(self, x):
            return self.body(x)

    with pytest.raises(ModelError) as e:
        cut_model(Net(), "body")
    assert str(e.value) == (
        "cut_model: cannot cut a Net at layer 'body': only an nn.Sequential can be cut (its "
        "children run one after the other); write the model as an nn.Sequential of its layers.")
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    with pytest.raises(ModelError) as e:
        cut_model(nested, "0.1")
    assert str(e.value) == (
        "cut_model: cannot cut at layer '0.1': it lies inside layer '0' (Sequential), and a cut "
        "can only follow one of the model's top-level layers: '0' (Sequential), '1' (Linear). "
        "Cut after '0', or flatten that block into the nn.Sequential.")
    with pytest.raises(ModelError) as e:
        cut_model(deep_model(), 4)
    assert str(e.value) == (
        "cut_model: cutting after layer '4' (Linear), the last layer, leaves the server nothing "
        "to compute; cut after one of '0' (Linear), '1' (ReLU), '2' (Linear), '3' (Tanh).")
    with pytest.raises(ModelError) as e:
        cut_model(deep_model(), "2", "1")
    assert str(e.value).startswith(
        "cut_model: the head cut after layer '1' (ReLU) must come after the first cut (after "
        "layer '2' (Linear))")
    with pytest.raises(ModelError, match=r"layer '2' \(Linear\) fails on the output"):
        cut_model(nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(6, 2)), "1",
                  input_shape=(8,))


def test_activations_of_the_wrong_shape_drop_the_client_naming_the_layer():
    tiny = make_tiny(clients=2, per_client=20)
    model = deep_model()
    split = cut_model(model, "1", input_shape=(8,))
    algo = SplitLearning(split, cross_entropy, batch_size=8, optimizer=sgd(0.1))

    def truncate(message, context, call):
        reply = call(message, context)
        if message.kind == "split.forward" and context.node_id == "client-1":
            a = reply.tensors["activations"]
            reply = reply.with_tensors({**reply.tensors, "activations": a[:, :-1]})
        return reply

    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, algo.handlers(),
                                   mods=[truncate])
    res = run(algo, transport, params=tree.params_of(model), rounds=1)
    assert res.history[0]["round/dropped"] == 1
    with pytest.raises(UpdateError) as e:
        check_activations(split, torch.zeros(8, 15), sender="client-1")
    expected = ("activations from 'client-1' at the cut after layer '1' (ReLU) have per-example "
                "shape (15,), expected (16,); the client's part of the model does not match the "
                "server's (same model and cut on both sides?).")
    assert str(e.value) == expected
    assert transport.stats.messages_up > 0
    # The round's report named the same reason (recorded in the dropped map).
    algo2 = SplitLearning(split, cross_entropy, batch_size=8, optimizer=sgd(0.1))
    state = algo2.init(tree.params_of(model))
    _, report = algo2.round(state, InProcessTransport(tiny.ids, tiny.data.__getitem__,
                                                      algo2.handlers(), mods=[truncate]), 1)
    assert report.dropped == {"client-1": expected}


def test_splitfed_caps_a_clients_inflated_weight():
    """A client that claims a billion examples gets its assigned count's weight under SplitFed
    (the attack, then the cap): the round equals the honest one and the cap is counted."""
    from dataclasses import replace

    from shoal.algorithms.influence import WeightCap

    tiny = make_tiny(clients=3, per_client=30)
    model = deep_model()
    params0 = tree.params_of(model)
    split = cut_model(model, "1", input_shape=(8,))

    def inflate(message, context, call):
        reply = call(message, context)
        if message.kind == "split.end" and context.node_id == "client-2":
            reply = replace(reply, config={**reply.config, "weight": 1e9})
        return reply

    def one_round(mods, cap):
        algo = SplitLearning(split, cross_entropy, schedule="splitfed", batch_size=8,
                             optimizer=sgd(0.1), seed=3, weight_cap=cap)
        res = run(algo, InProcessTransport(tiny.ids, tiny.data.__getitem__, algo.handlers(),
                                           mods=mods, on_error="raise"),
                  params=params0, rounds=1)
        return algo.params(res.state), res.history[0]

    claimed: dict[str, float] = {}

    def record(message, context, call):
        reply = call(message, context)
        if message.kind == "split.end":
            claimed[context.node_id] = reply.config["weight"]
        return reply

    honest, _ = one_round([record], None)
    cap = WeightCap(claimed)  # each client's honest claim is what the partition assigned it
    capped, metrics = one_round([inflate], cap)
    uncapped, _ = one_round([inflate], None)
    assert metrics["round/weights_capped"] == 1
    for k in honest:
        torch.testing.assert_close(capped[k], honest[k])
    assert max(float((uncapped[k] - honest[k]).abs().max()) for k in honest) > 1e-4
    with pytest.raises(Exception, match="weight_cap applies to the splitfed schedule"):
        SplitLearning(split, cross_entropy, weight_cap=cap)
