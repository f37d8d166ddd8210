"""SCAFFOLD: oracles (zero control variates = FedAvg; c is the mean of every client's c_i),
the same model and control variates under every executor, state that survives --resume bit for
bit and travels with its client between ranks, and the settings it refuses."""

from __future__ import annotations

import functools

import pytest
import torch

from shoal import tree
from shoal.aggregate import Pipeline, clip_by_norm, weighted_mean
from shoal.algorithms.cohort import Cohort
from shoal.algorithms.fedavg import FedAvg
from shoal.algorithms.scaffold import CONTROL_UPDATE, NODE_CONTROL, Scaffold
from shoal.checkpoint import Checkpoint, latest_checkpoint, restore
from shoal.client import local_sgd
from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.experiment import run_experiment
from shoal.privacy import dp_fedavg
from shoal.run import run
from shoal.sim import InProcessTransport
from shoal.sim.processes import ProcessesExecutor

from .conftest import cross_entropy, sgd
from .test_executors import assert_close, tiny_model, unequal_federation


def scaffold(model=None, *, lr: float = 0.1, cohort=None, **kwargs) -> Scaffold:
    model = model if model is not None else tiny_model()
    return Scaffold(local_sgd(model, cross_entropy, batch_size=4, optimizer=sgd(lr), epochs=2),
                    cohort=cohort, seed=5, **kwargs)


def train(algorithm, executor, rounds=3, data=None, callbacks=(), **run_kwargs):
    data_map, ids = data if data is not None else unequal_federation()
    with InProcessTransport(ids, data_map.__getitem__, algorithm.handlers(),
                            executor=executor) as transport:
        res = run(algorithm, transport, rounds=rounds, callbacks=list(callbacks), **run_kwargs)
        return res, transport.node_states()


def control_of(states, node):
    """The newest c_i a node keeps."""
    store = states[node]
    return store.versions[max(store.versions)][NODE_CONTROL]


def test_with_zero_control_variates_one_round_is_fedavg():
    model = tiny_model()
    update = local_sgd(model, cross_entropy, batch_size=4, optimizer=sgd(0.1), epochs=2)
    fed, _ = train(FedAvg(update, seed=5), None, rounds=1, params=tree.params_of(model))
    sca, _ = train(Scaffold(update, seed=5), None, rounds=1, params=tree.params_of(model))
    assert tree.equal(fed.state.params, sca.state.params)
    assert fed.history[0]["train/loss"] == sca.history[0]["train/loss"]


def test_the_control_variate_is_the_mean_of_every_clients():
    """c <- c + (1/N) sum(dc_i) keeps c = (1/N) sum_i c_i over the whole population, also with
    partial participation (clients never sampled hold c_i = 0)."""
    data, ids = unequal_federation()
    algo = scaffold(cohort=Cohort(3))
    res, states = train(algo, None, rounds=4, data=(data, ids),
                        params=tree.params_of(tiny_model()))
    total = {k: torch.zeros_like(v) for k, v in res.state.control.items()}
    for node in states:
        tree.add_(total, control_of(states, node))
    mean = tree.scale(total, 1 / len(ids))
    assert_close(mean, res.state.control)
    assert tree.norm(res.state.control) > 0


def test_the_control_variate_update_follows_option_two():
    """One client, one round: c_i+ = c_i - c + (x - y) / (K lr) with c = c_i = 0."""
    data, ids = unequal_federation()
    model = tiny_model()
    params = tree.params_of(model)
    res, states = train(scaffold(model, lr=0.1), None, rounds=1, data=({ids[0]: data[ids[0]]},
                                                                      ids[:1]), params=params)
    steps = res.history[0]["train/steps"]
    expected = {k: (params[k] - res.state.params[k]) / (steps * 0.1)
                for k in control_of(states, ids[0])}
    assert_close(control_of(states, ids[0]), expected)
    assert_close(res.state.control, expected)  # N = 1: c = c_1


@pytest.mark.parametrize("executor", ["vectorized", "processes"])
def test_every_executor_gives_the_sequential_model_and_control_variates(executor):
    """Clients sampled in turns (3 of 6 per round), so control variates are used, kept,
    and (processes) dealt to other ranks than the ones that made them."""
    params = tree.params_of(tiny_model())
    seq, seq_states = train(scaffold(cohort=Cohort(3)), "sequential", rounds=4, params=params)
    run_executor = ProcessesExecutor(2, inner="vectorized") if executor == "processes" \
        else executor
    got, got_states = train(scaffold(cohort=Cohort(3)), run_executor, rounds=4, params=params)
    assert_close(seq.state.params, got.state.params)
    assert_close(seq.state.control, got.state.control)
    assert seq_states.keys() == got_states.keys()
    for node in seq_states:
        assert seq_states[node].versions.keys() == got_states[node].versions.keys()
        assert_close(control_of(seq_states, node), control_of(got_states, node))


def test_resume_is_bit_identical_with_the_clients_state(tmp_path):
    params = tree.params_of(tiny_model())
    whole, whole_states = train(scaffold(cohort=Cohort(3)), None, rounds=4, params=params)
    data, ids = unequal_federation()
    first = scaffold(cohort=Cohort(3))
    train(first, None, rounds=2, params=params, callbacks=[Checkpoint(tmp_path)])
    # A fresh process: new algorithm, new transport; the clients' state comes from the checkpoint.
    second = scaffold(cohort=Cohort(3))
    with InProcessTransport(ids, data.__getitem__, second.handlers()) as transport:
        start, state, history = restore(latest_checkpoint(tmp_path), second, params, transport)
        assert start == 3 and len(transport.node_states()) > 0
        res = run(second, transport, rounds=4, state=state, start_round=start, history=history)
        states = transport.node_states()
    assert tree.equal(whole.state.params, res.state.params)
    assert tree.equal(whole.state.control, res.state.control)
    for node in whole_states:
        assert tree.equal(control_of(whole_states, node), control_of(states, node))


def test_an_interrupted_scaffold_run_resumes_bit_identically(tmp_path):
    """Through `shoal run`'s path: checkpoints hold the clients' control variates."""
    import safetensors.torch

    overrides = ["federated.algorithm=scaffold", "federated.rounds=4", "baseline=false",
                 "client.epochs=1", "federated.clients_per_round=5"]
    run_experiment(load_config(None, overrides), tmp_path / "full")

    class Interrupt:
        def after_round(self, ctx, report):
            if report.round == 2:
                raise KeyboardInterrupt

    config = load_config(None, overrides)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut", callbacks=lambda p, r: [Interrupt()])
    run_experiment(config, tmp_path / "cut", resume=True)
    full, cut = (safetensors.torch.load_file(str(tmp_path / d / "federated" /
                                                 "model.safetensors")) for d in ("full", "cut"))
    assert tree.equal(full, cut)


def test_a_rerun_round_starts_from_the_state_before_it():
    """A deployed client answering round r again (the coordinator resumed from round r - 1)
    starts from its c_i as of before round r, not from what its first answer wrote."""
    data, ids = unequal_federation()
    algo = scaffold()
    params = tree.params_of(tiny_model())
    with InProcessTransport(ids[:1], data.__getitem__, algo.handlers()) as transport:
        state = algo.init(params)
        _, _ = algo.round(state, transport, 1)
        first, _ = algo.round(state, transport, 2)
        again, _ = algo.round(state, transport, 2)  # the same round, run twice
    assert tree.equal(first.params, again.params)
    assert tree.equal(first.control, again.control)


def test_the_cli_config_runs_scaffold_and_reports_its_cost(tmp_path):
    config = load_config(None, ["federated.algorithm=scaffold", "federated.rounds=2",
                                "baseline=false", "federated.executor=vectorized"])
    (result,) = run_experiment(config, tmp_path)
    assert result.rounds == 2 and result.final["accuracy"] > 0.3
    h = result.history[0]
    # Down: params and c; up: the update and dc, for each sampled client.
    assert h["comm/bytes/train"] > 0 and "scaffold/control_norm" in h


def test_refused_settings_say_why():
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"SCAFFOLD's control variates \(option II\) assume "
                                          r"plain SGD steps"):
        Scaffold(local_sgd(model, cross_entropy, optimizer=functools.partial(
            torch.optim.SGD, lr=0.1, momentum=0.9)))
    with pytest.raises(ConfigError, match=r"protects only the model update, but SCAFFOLD also "
                                          r"sends each client's control-variate update"):
        Scaffold(local_sgd(model, cross_entropy, optimizer=sgd(0.1)),
                 pipeline=Pipeline([dp_fedavg(1.0, 1.0, Cohort(0.5, "poisson"))],
                                   weighted_mean("uniform")))
    with pytest.raises(ConfigError, match=r"^config field 'federated.algorithm': \"scaffold\" "
                                          r"sends each client's control-variate update"):
        run_experiment(load_config(None, ["federated.algorithm=scaffold",
                                          "secagg.enabled=true"]), "/nonexistent/never-made")


def test_a_client_stage_still_applies_to_the_model_update():
    params = tree.params_of(tiny_model())
    res, _ = train(scaffold(pipeline=Pipeline([clip_by_norm(1e-3)])), None, rounds=1,
                   params=params)
    assert tree.norm(tree.sub(res.state.params, params)) <= 1e-3 + 1e-7
    assert res.history[0]["round/replied"] == 6


def test_replies_without_control_updates_are_dropped():
    def strip(m, ctx, handler):
        reply = handler(m, ctx)
        if m.dst == "client-1":
            return reply.with_tensors({k: v for k, v in reply.tensors.items()
                                       if not k.startswith(CONTROL_UPDATE)})
        return reply

    data, ids = unequal_federation()
    algo = scaffold()
    with InProcessTransport(ids, data.__getitem__, algo.handlers(), mods=[strip]) as transport:
        res = run(algo, transport, rounds=1, params=tree.params_of(tiny_model()))
    assert res.history[0]["round/dropped"] == 1.0
    assert res.history[0]["round/replied"] == 5.0
