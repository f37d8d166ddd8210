"""SecureFedAvg: as accurate as FedAvg, refuses reducers that need individual updates, fails
rounds cleanly, evaluates securely, and is wired into the config and the runner."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from shoal import tree
from shoal.aggregate import Pipeline, clip_by_norm, coordinate_median, krum, weighted_mean
from shoal.algorithms.cohort import cohort
from shoal.algorithms.fedavg import FedAvg
from shoal.callbacks import FederatedEvaluation
from shoal.client import local_sgd
from shoal.config import load_config
from shoal.data.arrays import ArrayData
from shoal.data.federated import ClientData
from shoal.errors import AggregationError, ClientError, ConfigError
from shoal.experiment import run_experiment
from shoal.metrics import Evaluator
from shoal.privacy import dp_fedavg
from shoal.run import run
from shoal.secagg import SecureFedAvg, SecureFederatedEvaluation, secure_aggregation
from shoal.secagg.fedavg import LOSS_CLIP
from shoal.secagg.protocol import MASKED_INPUT
from shoal.secagg.quantize import error_bound, levels_for
from shoal.sim import InProcessTransport, simulated_dropout

from ..conftest import cross_entropy, make_tiny, sgd
from ._helpers import Recording


def _pair(tiny, **secagg):
    model = tiny.model()
    update = local_sgd(model, cross_entropy, epochs=1, batch_size=8, optimizer=sgd(0.1))
    ev = Evaluator(model, cross_entropy)
    plain = FedAvg(update, client_eval=ev, seed=7)
    secure = SecureFedAvg(update, secagg=secure_aggregation(**secagg), client_eval=ev, seed=7)
    return model, plain, secure


def test_secure_fedavg_matches_plain_fedavg():
    torch.set_num_threads(1)
    tiny = make_tiny(clients=6)
    model, plain, secure = _pair(tiny, clip=10.0)
    params0 = tree.params_of(model)
    results = {}
    for name, alg in (("plain", plain), ("secure", secure)):
        transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, alg.handlers(),
                                       on_error="raise")
        results[name] = run(alg, transport, params=params0, rounds=3)
    p, s = (alg_result.state.params for alg_result in (results["plain"], results["secure"]))
    for k in p:
        torch.testing.assert_close(s[k], p[k], rtol=0, atol=1e-5)
    assert not tree.equal(p, params0)
    hp, hs = results["plain"].history[-1], results["secure"].history[-1]
    assert hs["train/examples"] == hp["train/examples"]
    assert hs["train/loss"] == pytest.approx(hp["train/loss"], abs=1e-5)
    assert hs["round/replied"] == 6 and hs["secagg/neighbours"] == 5


def test_dp_fedavg_with_adaptive_clipping_runs_over_secure_aggregation():
    # The DP stage adds a scalar to each update (the below-clip bit): the secure sum must carry
    # it, and the example count must survive uniform weighting (each client's weight is 1).
    torch.set_num_threads(1)
    tiny = make_tiny(clients=6)
    model = tiny.model()
    update = local_sgd(model, cross_entropy, epochs=1, batch_size=8, optimizer=sgd(0.1))
    params0 = tree.params_of(model)
    results = {}
    for name, cls, extra in (("plain", FedAvg, {}),
                             ("secure", SecureFedAvg, {"secagg": secure_aggregation(clip=10.0)})):
        stage = dp_fedavg(1.0, 0.5, cohort(), adaptive=True, count_stddev=1.0,
                          reproducible=True)
        alg = cls(update, pipeline=Pipeline([stage], weighted_mean("uniform")), seed=7, **extra)
        transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, alg.handlers(),
                                       on_error="raise")
        results[name] = run(alg, transport, params=params0, rounds=3)
    hp, hs = results["plain"].history[-1], results["secure"].history[-1]
    assert hs["round/replied"] == 6 and hs["train/examples"] == hp["train/examples"] > 6
    assert hs["dp/clip_norm"] == pytest.approx(hp["dp/clip_norm"], rel=1e-4)
    assert hs["dp/below_clip_fraction"] == pytest.approx(hp["dp/below_clip_fraction"], abs=1e-4)
    p, s = results["plain"].state.params, results["secure"].state.params
    for k in p:
        torch.testing.assert_close(s[k], p[k], rtol=0, atol=1e-4)


def test_the_coordinator_sees_no_update_in_the_clear():
    tiny = make_tiny(clients=5)
    model, _, secure = _pair(tiny)
    transport = Recording(InProcessTransport(tiny.ids, tiny.data.__getitem__, secure.handlers()))
    state, report = secure.round(secure.init(tree.params_of(model)), transport, 1)
    assert report.failed is None
    n = tree.numel(state.params)
    for reply in transport.received:
        assert not reply.metrics and "weight" not in reply.config
        for t in reply.tensors.values():
            assert not t.dtype.is_floating_point
        if reply.kind == MASKED_INPUT:
            assert reply.tensors["masked"].shape == (n + 6,)  # the update, 6 scalars
    # The clients will not answer the plain kinds, which would reveal updates or metrics.
    assert set(secure.handlers()) == {"secagg.advertise", "secagg.share_keys",
                                      MASKED_INPUT, "secagg.consistency", "secagg.unmask"}


@pytest.mark.parametrize("reducer", [coordinate_median(), krum(1)])
def test_reducers_that_need_individual_updates_fail_at_construction(reducer):
    with pytest.raises(AggregationError) as e:
        SecureFedAvg(None, pipeline=Pipeline([], reducer))  # type: ignore[arg-type]
    assert str(e.value) == (
        f"{reducer!r} needs individual updates, but secure_aggregation(clip=10, "
        "max_weight=1000, neighbours=None, threshold=0.51, max_mse=10000) reveals only their sum; use "
        "weighted_mean().")


def test_coordinator_side_stages_fail_at_construction():
    with pytest.raises(AggregationError, match="runs on each update at the coordinator"):
        SecureFedAvg(None, pipeline=Pipeline([clip_by_norm(1.0, "coordinator")]))  # type: ignore[arg-type]
    SecureFedAvg(None, pipeline=Pipeline([clip_by_norm(1.0)], weighted_mean()))  # type: ignore[arg-type]


def test_the_stage_never_lets_plain_fedavg_send_updates_in_the_clear(tiny):
    model = tiny.model()
    update = local_sgd(model, cross_entropy, epochs=1, optimizer=sgd(0.1))
    fedavg = FedAvg(update, pipeline=Pipeline([secure_aggregation()]))
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, fedavg.handlers(),
                                   on_error="raise")
    with pytest.raises(ClientError) as e:
        fedavg.round(fedavg.init(tree.params_of(model)), transport, 1)
    assert "ran outside a secure-aggregation session: plain FedAvg would send this update in " \
           "the clear. Use shoal.secagg.SecureFedAvg with this pipeline." in str(e.value)


def test_a_round_with_too_few_survivors_fails_and_leaves_the_model_unchanged():
    tiny = make_tiny(clients=6)
    model, _, secure = _pair(tiny)
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, secure.handlers(),
                                   mods=[simulated_dropout(0.9, 0, kinds=(MASKED_INPUT,))])
    state0 = secure.init(tree.params_of(model))
    state, report = secure.round(state0, transport, 1)
    assert report.failed is not None and report.failed.startswith("secure aggregation got ")
    assert "no partial result is used" in report.failed
    assert state is state0 and tree.equal(state.params, tree.params_of(model))


def test_secure_federated_evaluation_equals_plain_federated_evaluation():
    tiny = make_tiny(clients=6)
    model, plain, secure = _pair(tiny)
    params = tree.params_of(model)
    t_plain = InProcessTransport(tiny.ids, tiny.data.__getitem__, plain.handlers())
    t_secure = Recording(InProcessTransport(tiny.ids, tiny.data.__getitem__, secure.handlers()))

    class Ctx:
        def __init__(self, alg, transport):
            self.algorithm, self.transport, self.round = alg, transport, 1
            self.state = alg.init(params)

        def params(self):
            return params

    want = FederatedEvaluation().evaluate(Ctx(plain, t_plain))
    got = SecureFederatedEvaluation().evaluate(Ctx(secure, t_secure))
    assert got["fed_eval/clients"] == want["fed_eval/clients"] == 6
    assert got["fed_eval/examples"] == want["fed_eval/examples"]
    assert got["fed_eval/accuracy"] == pytest.approx(want["fed_eval/accuracy"], abs=1e-6)
    assert got["fed_eval/loss"] == pytest.approx(want["fed_eval/loss"], abs=1e-5)
    assert all(not r.metrics for r in t_secure.received)  # no per-client metric went up


def test_clamped_weights_and_losses_are_counted_not_silent():
    """A weight over max_weight counts as max_weight, a loss over LOSS_CLIP as LOSS_CLIP: both
    are counted in the secure sum (round/weights_capped as FedAvg's, train/loss_clipped)."""
    from dataclasses import replace

    tiny = make_tiny(clients=6)
    model = tiny.model()
    inner = local_sgd(model, cross_entropy, epochs=1, batch_size=8, optimizer=sgd(0.1))

    def update(params, data, info):
        result = inner(params, data, info)
        if info.client_id == "client-2":  # a diverged client
            result = replace(result, metrics={**result.metrics, "train/loss": 1e4})
        return result

    secure = SecureFedAvg(update, secagg=secure_aggregation(max_weight=10.0), seed=7)
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, secure.handlers(),
                                   on_error="raise")
    last = run(secure, transport, params=tree.params_of(model), rounds=1).history[-1]
    assert last["round/weights_capped"] == 6  # each client trained on 25 examples > 10
    assert last["train/loss_clipped"] == 1
    assert last["train/loss"] < LOSS_CLIP


class _Regression:
    """A linear model on a regression task of ``clients`` clients (an MSE in the tens, below the
    loss's public bound of 100, at ``scale = 2``), with plain and secure FedAvg over it, the
    secure one with ``secagg`` settings and ``pipeline``. ``held`` held-out rows per client."""

    def __init__(self, clients: int = 6, scale: float = 2.0, held: int = 10, pipeline=None,
                 **secagg):
        g = torch.Generator().manual_seed(5)
        x = torch.randn(30 * clients, 8, generator=g)
        y = x @ torch.randn(8, generator=g) * scale + 2.5 * scale
        self.data = {
            f"client-{i}": ClientData(ArrayData(x, y, torch.arange(i * 30, i * 30 + 20)),
                                      ArrayData(x, y, torch.arange(i * 30 + 20,
                                                                   i * 30 + 20 + held)))
            for i in range(clients)}

        class Linear(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(8, 1)

            def forward(self, v):
                return self.fc(v).squeeze(-1)

        model = Linear()
        ev = Evaluator(model, torch.nn.functional.mse_loss, kind="regression")
        update = local_sgd(model, torch.nn.functional.mse_loss, epochs=1, batch_size=8,
                           optimizer=sgd(0.01))
        self.plain = FedAvg(update, client_eval=ev, pipeline=pipeline)
        self.secure = SecureFedAvg(update, secagg=secure_aggregation(**secagg), client_eval=ev,
                                   pipeline=pipeline)
        self.params = tree.params_of(model)
        self.ids = sorted(self.data)

    def transport(self, alg):
        return InProcessTransport(self.ids, self.data.__getitem__, alg.handlers())

    def evaluations(self):
        """Plain and secure federated evaluation of the model."""
        reg = self

        class Ctx:
            def __init__(self, alg):
                self.algorithm, self.round = alg, 1
                self.transport = reg.transport(alg)

            def params(self):
                return reg.params

        return (FederatedEvaluation(metric="rmse").evaluate(Ctx(self.plain)),
                SecureFederatedEvaluation().evaluate(Ctx(self.secure)))


def _regression_evaluations(**secagg):
    return _Regression(**secagg).evaluations()


def test_secure_federated_evaluation_of_a_regression_task_pools_its_errors():
    """MSE, MAE, RMSE and the loss pooled as plain federated evaluation pools them, within the
    quantization's error bound; no accuracy is made up for a regression."""
    want, got = _regression_evaluations()
    assert got["fed_eval/clients"] == want["fed_eval/clients"] == 6
    assert got["fed_eval/examples"] == want["fed_eval/examples"] == 60
    assert got["fed_eval/clipped"] == 0 and "fed_eval/accuracy" not in got
    levels = levels_for(6)
    for key, bound in (("mse", 1e4), ("mae", 1e2), ("loss", LOSS_CLIP)):
        tol = error_bound(6, 1000.0 * bound, levels) / 60
        assert got[f"fed_eval/{key}"] == pytest.approx(want[f"fed_eval/{key}"], abs=tol), key
    assert 25 < want["fed_eval/mse"] < LOSS_CLIP
    assert got["fed_eval/rmse"] == pytest.approx(math.sqrt(got["fed_eval/mse"]))


def test_secure_federated_evaluation_counts_the_clients_over_the_public_bound():
    want, got = _regression_evaluations(max_mse=25.0)
    assert want["fed_eval/mse"] > 25
    assert got["fed_eval/clipped"] == 6  # every client's MSE was over 25, and counted as 25
    assert got["fed_eval/mse"] == pytest.approx(25.0, abs=1e-4)
    assert got["fed_eval/mae"] <= 5.0 + 1e-4


def test_config_section_and_errors(tmp_path):
    config = load_config(None, ["secagg.enabled=true", "secagg.neighbours=4"])
    assert config.secagg.enabled and config.secagg.neighbours == 4
    assert config.secagg.threshold == 0.51  # the smallest majority of the neighbours
    for bad in ("1.5", "0.5", "0.4"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"secagg.threshold={bad}"])
        assert str(e.value) == (
            f"config field 'secagg.threshold': expected a fraction of the neighbours in "
            f"(0.5, 1], got {float(bad)}: at or below one half a coordinator that tells some "
            "neighbours a client survived and the others that it dropped could unmask its "
            "input.")
    with pytest.raises(ConfigError) as info:
        run_experiment(load_config(None, ["secagg.enabled=true", "federated.reducer=median",
                                          "federated.rounds=1"]), tmp_path / "run")
    assert str(info.value) == (
        "config field 'federated.reducer': secure aggregation (secagg.enabled = true) reveals "
        "only the sum of the updates, which federated.reducer = \"median\" cannot reduce (it "
        "needs each update); set federated.reducer = \"mean\", or secagg.enabled = false to "
        "keep the robust reducer.")
    assert not (tmp_path / "run").exists()  # refused before a run directory was made


def test_run_experiment_with_secure_aggregation(tmp_path):
    config = load_config(None, ["secagg.enabled=true", "federated.rounds=2", "client.epochs=1",
                                "federated.clients_per_round=6", "baseline=false",
                                "evaluation.federated_every=1"])
    (fed,) = run_experiment(config, tmp_path)
    assert fed.rounds == 2
    last = fed.history[-1]
    assert last["round/replied"] == 6 and last["secagg/neighbours"] == 5
    assert last["fed_eval/secure"] == 1.0 and last["fed_eval/clients"] == 20
    assert 0 < fed.final["accuracy"] <= 1 and np.isfinite(last["train/loss"])


@pytest.mark.parametrize("task, config", [
    # one metric under rising bounds: the sums' slope drops at each client's own value
    ("evaluate", {"means": [["examples", 5.0], ["mse", 40.0], ["mse", 50.0]]}),
    ("evaluate", {"means": [["loss", 100.0], ["mse", 1.0], ["mae", 1.0]]}),
    ("train", {"clip": 0.001}),
    ("train", {"max_weight": 1.0}),
])
def test_a_coordinator_cannot_choose_what_clients_sum_or_under_which_bounds(task, config):
    """The attack: a coordinator that picks the means or the bounds could read one client's
    figure off several sums; a client sums only under its own config's, and refuses."""
    from shoal.secagg.session import secure_sum

    reg = _Regression(clients=3)
    honest = reg.secure._public(task)
    stages = reg.secure.pipeline.client_configs(reg.secure.init(reg.params).stage_states)
    res = secure_sum(reg.transport(reg.secure), reg.ids, round=1, session=f"{task}-1",
                     task=task, length=tree.numel(reg.params) + 6 if task == "train" else 6,
                     payload=reg.params, config={"stages": stages, **honest, **config},
                     neighbours=None, threshold=0.51, seed=0)
    assert res.failed is not None and res.total is None
    name = next(iter(config))
    assert all(f"the coordinator asked to sum with {name} = " in why
               and "refused" in why for why in res.dropped.values()), res.dropped


def test_secure_evaluation_with_uniform_weighting_counts_the_examples():
    """Uniform weighting sends max_weight 1 for training; evaluation still weighs by examples."""
    from shoal.aggregate import weighted_mean as mean

    want, got = _Regression(pipeline=Pipeline([], mean("uniform"))).evaluations()
    assert got["fed_eval/examples"] == want["fed_eval/examples"] == 60
    levels = levels_for(6)
    assert got["fed_eval/mse"] == pytest.approx(
        want["fed_eval/mse"], abs=error_bound(6, 1000.0 * 1e4, levels) / 60)


def test_an_imprecise_secure_mean_is_said_so(caplog):
    """Standardized targets (an MSE near 0.01) under a bound of 1e6 per client: the pooled MSE
    is within its quantization error, and the log says so, naming the setting to change."""
    want, got = _Regression(clients=50, scale=0.05, max_mse=1e6).evaluations()
    with caplog.at_level(logging.WARNING):
        _, got = _Regression(clients=50, scale=0.05, max_mse=1e6).evaluations()
    assert "fed_eval/mse" in caplog.text and "within its quantization error" in caplog.text
    assert "set secagg.max_mse nearer the largest MSE a client can have" in caplog.text
    # the default bound (1e4) is precise enough here
    want, got = _Regression(clients=50, scale=0.05).evaluations()
    assert got["fed_eval/mse"] == pytest.approx(want["fed_eval/mse"], rel=0.1)


def test_more_held_out_examples_than_max_weight_are_counted_as_clipped():
    """A client holding out more examples than max_weight counts with max_weight, and says so."""
    want, got = _Regression(held=10, max_weight=8.0).evaluations()
    assert want["fed_eval/examples"] == 60
    assert got["fed_eval/examples"] == 48 and got["fed_eval/clipped"] == 6
