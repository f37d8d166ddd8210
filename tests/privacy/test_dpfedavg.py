"""DP-FedAvg stage: clipping, noise statistics, the fixed denominator, adaptive clipping to a
quantile, the uniform-mean requirement, and the round trip through FedAvg."""

from __future__ import annotations

import math

import pytest
import torch

from shoal import tree
from shoal.aggregate import Pipeline, weighted_mean
from shoal.algorithms.cohort import cohort
from shoal.algorithms.fedavg import FedAvg
from shoal.client import local_sgd
from shoal.errors import AggregationError, ConfigError
from shoal.privacy import dp_fedavg
from shoal.privacy.dpfedavg import BELOW_CLIP
from shoal.sim import InProcessTransport
from shoal.types import ClientInfo, RoundInfo

from ..conftest import cross_entropy, make_tiny, sgd

INFO = ClientInfo("c", 1, 0)


def test_client_half_clips_to_the_round_norm_and_reports_the_bit():
    stage = dp_fedavg(1.0, 2.0, cohort(10), adaptive=True)
    big = {"w": torch.full((4,), 3.0)}  # norm 6
    small = {"w": torch.full((4,), 0.5)}  # norm 1
    cfg = stage.client_config(stage.init())
    out = stage.client(big, cfg, INFO)
    assert tree.norm({"w": out["w"]}) == pytest.approx(2.0)
    assert out[BELOW_CLIP].item() == -0.5
    out = stage.client(small, cfg, INFO)
    assert torch.equal(out["w"], small["w"]) and out[BELOW_CLIP].item() == 0.5
    # The server's current clip norm governs, not the initial one.
    assert tree.norm({"w": stage.client(big, {"clip_norm": 0.5}, INFO)["w"]}) == pytest.approx(0.5)


def test_noise_std_is_z_times_clip_over_expected_cohort_and_mean_is_unbiased():
    z, clip, d = 1.5, 0.8, 20_000
    stage = dp_fedavg(z, clip, cohort(0.1, "poisson"), reproducible=True)  # expected 10 of 100
    mean_of_replies = {"w": torch.full((d,), 0.3)}  # 12 replies, each 0.3 per coordinate
    info = RoundInfo(round=4, seed=9, sampled=12, replied=12, population=100)
    out, state, metrics = stage.server(mean_of_replies, stage.init(), info)
    w = out["w"]
    # Fixed denominator: sum (12 * 0.3) over the expected cohort (10), plus noise z*C/10.
    assert w.mean().item() == pytest.approx(12 * 0.3 / 10, abs=4 * z * clip / 10 / math.sqrt(d))
    assert w.std().item() == pytest.approx(z * clip / 10, rel=0.03)
    assert metrics["dp/noise_std"] == pytest.approx(z * clip / 10)
    assert state == {"clip_norm": clip}
    again, _, _ = stage.server(mean_of_replies, stage.init(), info)
    assert torch.equal(again["w"], w)  # reproducible: the noise derives from the seed, round


def test_the_noise_is_secret_by_default_and_keeps_its_scale():
    z, clip, d = 1.5, 0.8, 20_000
    stage = dp_fedavg(z, clip, cohort(0.1, "poisson"))
    assert "reproducible" not in repr(stage)
    mean_of_replies = {"w": torch.full((d,), 0.3)}
    info = RoundInfo(round=4, seed=9, sampled=12, replied=12, population=100)
    a, _, _ = stage.server(mean_of_replies, stage.init(), info)
    b, _, _ = stage.server(mean_of_replies, stage.init(), info)
    seeded, _, _ = dp_fedavg(z, clip, cohort(0.1, "poisson"), reproducible=True).server(
        mean_of_replies, stage.init(), info)
    assert not torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], seeded["w"])
    for out in (a, b):
        assert out["w"].std().item() == pytest.approx(z * clip / 10, rel=0.03)


def test_adaptive_clipping_splits_the_noise_as_andrew_et_al():
    stage = dp_fedavg(1.0, 1.0, cohort(100), adaptive=True)  # sigma_b = 100 / 20 = 5
    z_delta = stage.update_noise_multiplier(1000)
    assert z_delta == pytest.approx((1.0 ** -2 - (2 * 5.0) ** -2) ** -0.5)
    # The two releases together are one Gaussian with multiplier z.
    assert z_delta ** -2 + (2 * 5.0) ** -2 == pytest.approx(1.0)
    with pytest.raises(ConfigError) as e:
        dp_fedavg(4.0, 1.0, cohort(20), adaptive=True).update_noise_multiplier(100)
    assert str(e.value) == (
        "dp_fedavg: with adaptive clipping the count noise σ_b = 1 must exceed "
        "noise_multiplier / 2 = 2, or the update sum gets no privacy budget; raise "
        "count_stddev or sample more clients per round.")


def test_adaptive_clip_norm_converges_to_the_target_quantile():
    """Update norms uniform on (0, 10): C should settle near the γ-quantile 10γ."""
    for gamma in (0.3, 0.7):
        # reproducible: the noisy count's draws are seeded, so the figure is the same on every
        # run (with secret noise, its standard deviation of 0.05 made a 2-sigma check flaky)
        stage = dp_fedavg(0.5, 1.0, cohort(200), adaptive=True, target_quantile=gamma,
                          clip_lr=0.2, reproducible=True)
        pipeline = Pipeline([stage], weighted_mean("uniform"))
        states = pipeline.init()
        g = torch.Generator().manual_seed(1)
        for r in range(1, 80):
            configs = pipeline.client_configs(states)
            norms = torch.rand(200, generator=g) * 10
            updates = [pipeline.client({"w": torch.tensor([float(n), 0.0])}, configs,
                                       ClientInfo(f"c{i}", r, 0)) for i, n in enumerate(norms)]
            _, states, metrics = pipeline.aggregate(
                updates, [1.0] * 200, states, configs, RoundInfo(r, 0, 200, 200, 2000))
        assert states[0]["clip_norm"] == pytest.approx(10 * gamma, rel=0.15)
        assert metrics["dp/below_clip_fraction"] == pytest.approx(gamma, abs=0.1)


def test_needs_the_uniform_mean():
    stage = dp_fedavg(1.0, 1.0, cohort(10))
    with pytest.raises(AggregationError) as e:
        Pipeline([stage], weighted_mean())
    assert str(e.value) == (
        "dp_fedavg(noise_multiplier=1, clip_norm=1, cohort(10)) needs the uniform mean, "
        "weighted_mean('uniform'): its noise is calibrated to one client's clipped update, but "
        "weighted_mean() lets a client's weight scale its influence; use "
        "weighted_mean('uniform').")
    Pipeline([stage], weighted_mean("uniform"))


def test_round_trip_through_fedavg_with_adaptive_clipping():
    tiny = make_tiny(clients=6)
    model = tiny.model()
    stage = dp_fedavg(0.5, 0.05, cohort(0.5, "poisson"), adaptive=True, count_stddev=1.0)
    fedavg = FedAvg(local_sgd(model, cross_entropy, batch_size=8, optimizer=sgd(0.1)),
                    pipeline=Pipeline([stage], weighted_mean("uniform")),
                    cohort=cohort(0.5, "poisson"), seed=3)
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, fedavg.handlers())
    state = fedavg.init(tree.params_of(model))
    for r in (1, 2, 3):
        state, report = fedavg.round(state, transport, r)
        assert report.failed is None and not report.dropped, report.dropped
        assert BELOW_CLIP not in state.params
    assert state.stage_states[0]["clip_norm"] != 0.05  # it adapted
    assert "dp/below_clip_fraction" in report.metrics


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match=r"dp_fedavg: clip_norm must be > 0 \(got 0\)"):
        dp_fedavg(1.0, 0, cohort(10))
    with pytest.raises(ConfigError, match=r"target_quantile must be in \(0, 1\) \(got 1\)"):
        dp_fedavg(1.0, 1.0, cohort(10), target_quantile=1)
