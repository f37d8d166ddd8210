"""Distributed DP (the distributed discrete Gaussian over secure aggregation): the sampler, the
encoding, the accounting against dp-accounting, the coordinator's view, and the config."""

from __future__ import annotations

import dataclasses
import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal import tree
from shoal.aggregate import Pipeline, weighted_mean
from shoal.algorithms.fedavg import FedAvg
from shoal.config import load_config
from shoal.errors import AggregationError, ConfigError
from shoal.experiment import run_experiment
from shoal.message import COORDINATOR, Message
from shoal.observe import Recorder
from shoal.privacy import DistributedDP, distributed_dp
from shoal.privacy.distributed import calibrate_distributed, discrete_gaussian
from shoal.privacy.secure_random import SecureGenerator
from shoal.run import run
from shoal.secagg import SecureFedAvg, secure_aggregation
from shoal.secagg.crypto import KEY_BYTES, mask_stream
from shoal.secagg.protocol import CONSISTENCY, MASKED_INPUT, UNMASK, raw
from shoal.secagg.shamir import combine_bytes
from shoal.seeding import numpy_rng
from shoal.sim import InProcessTransport
from shoal.types import ClientResult

from ..secagg._helpers import Coordinator

# -- the discrete Gaussian sampler --------------------------------------------------------------


def _exact_pmf(sigma: float, ks: np.ndarray) -> np.ndarray:
    support = np.arange(-60 * max(sigma, 1), 60 * max(sigma, 1) + 1)
    norm = np.exp(-support ** 2 / (2 * sigma ** 2)).sum()
    return np.exp(-ks ** 2 / (2 * sigma ** 2)) / norm


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5])
def test_discrete_gaussian_matches_its_probability_mass_function(sigma):
    n = 400_000
    x = discrete_gaussian(n, sigma, SecureGenerator(bytes(32)))
    assert x.dtype == np.int64 and x.shape == (n,)
    ks = np.arange(-4, 5)
    freq = np.array([(x == k).sum() for k in ks]) / n
    pmf = _exact_pmf(sigma, ks)
    # within 5 standard errors of a binomial proportion, for every value
    assert np.all(np.abs(freq - pmf) <= 5 * np.sqrt(pmf * (1 - pmf) / n) + 1e-6)


def test_discrete_gaussian_of_a_large_sigma_has_that_standard_deviation():
    x = discrete_gaussian(200_000, 1e6, SecureGenerator(bytes(32)))
    assert abs(x.std() / 1e6 - 1) < 0.01 and abs(x.mean()) < 5 * 1e6 / math.sqrt(2e5)


# -- the encoding -------------------------------------------------------------------------------

def _stage(**kw) -> DistributedDP:
    args = dict(noise_multiplier=1.0, clip_norm=1.0, dim=2000, min_clients=9, max_clients=10)
    return DistributedDP(**{**args, **kw})


@settings(max_examples=40, deadline=None)
@given(norm=st.floats(0.0, 5.0), spike=st.booleans(), coarse=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_conditional_rounding_keeps_the_sensitivity_the_accountant_uses(norm, spike, coarse,
                                                                        seed):
    """Whatever the update (under the clip or above it, one spike or spread out, on a fine or a
    coarse grid), the rounded vector's norm in grid steps is at most Δ₂, and every coordinate
    is the clipped, scaled one rounded down or up."""
    stage = _stage(dim=300, max_clients=10 ** 8 if coarse else 10)
    rng = np.random.default_rng(seed)
    x = np.zeros(300) if spike else rng.standard_normal(300)
    x[7] += 1.0 if spike else 0.0
    x = x / (np.linalg.norm(x) or 1) * norm
    r = stage.rounded(x, SecureGenerator())
    assert r.dtype == np.int64
    assert float(np.linalg.norm(r)) <= stage.l2_bound
    scaled = x * min(1.0, 1.0 / norm if norm > 0 else 1.0) / stage.granularity
    assert np.all((r == np.floor(scaled)) | (r == np.ceil(scaled)))


def test_conditional_rounding_redraws_a_vector_that_rounded_too_long():
    """On a coarse grid (10^8 possible contributors: C is 20 steps) a vector of half steps at
    the clipping norm rounds, unconditionally, above Δ₂ about a third of the time at β = 0.99;
    conditional rounding redraws, so the bound always holds."""
    steps = 1 / _stage(max_clients=10 ** 8).granularity  # C in grid steps
    dim = int(4 * steps ** 2)  # d/4 = c²: a vector of half steps has norm C
    stage = _stage(max_clients=10 ** 8, dim=dim, beta=0.99)
    x = np.full(dim, 0.5 * stage.granularity)
    gen = SecureGenerator(bytes(32))
    plain = [np.linalg.norm((gen.random(dim).numpy() < 0.5).astype(float)) for _ in range(200)]
    assert 0.1 < np.mean(np.array(plain) > stage.l2_bound) < 0.9  # what the condition prevents
    assert all(np.linalg.norm(stage.rounded(x, gen)) <= stage.l2_bound for _ in range(100))


def test_the_sum_of_encodings_decodes_to_the_sum_plus_the_promised_noise():
    stage = _stage(noise_multiplier=2.0, clip_norm=0.5, dim=20_000)
    rng = np.random.default_rng(0)
    updates = [rng.standard_normal(20_000) * 0.01 for _ in range(10)]  # norms about 1.4 > C
    total = np.zeros(20_000, dtype=np.uint32)
    for u in updates:
        total += stage.encode(u, SecureGenerator())
    clipped = sum(u * min(1.0, 0.5 / np.linalg.norm(u)) for u in updates)
    noise = stage.decode(total) - clipped
    expected = 2.0 * 0.5 * math.sqrt(10 / 9)  # z C sqrt(m / n_min)
    assert abs(noise.std() / expected - 1) < 0.03
    assert abs(noise.mean()) < 5 * expected / math.sqrt(20_000)


def test_the_encoding_refuses_what_it_was_not_calibrated_for():
    stage = _stage()
    with pytest.raises(AggregationError, match="the update has 3 values, but the noise was "
                                               "calibrated for 2000"):
        stage.encode(np.ones(3), SecureGenerator())
    with pytest.raises(AggregationError, match="NaN or infinite"):
        stage.encode(np.full(2000, np.nan), SecureGenerator())
    with pytest.raises(ConfigError) as e:
        _stage(min_clients=1)
    assert "min_clients must be >= 2 (got 1)" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _stage(noise_multiplier=1e-9)
    assert "below the 1/2 the accounting theorem needs" in str(e.value)


# -- accounting ---------------------------------------------------------------------------------

def _oracle_epsilon(stage: DistributedDP, rounds: int, delta: float) -> float:
    """Kairouz, Liu & Steinke (2021), Proposition 14, written out from the paper: the RDP of
    each order is the smallest of three terms, composed over the rounds, converted to (ε, δ)
    by dp-accounting's RDP conversion."""
    d = stage.dim
    sigma = stage.local_std
    n = stage.min_clients
    tau = 10 * sum(math.exp(-2 * math.pi ** 2 * sigma ** 2 * k / (k + 1)) for k in range(1, n))
    c = stage.clip_norm / stage.granularity
    l2 = min(c + math.sqrt(d), math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / stage.beta))
                                         * (c + math.sqrt(d) / 2)))
    l1 = l2 * min(math.sqrt(d), l2)
    s, s1 = l2 / (math.sqrt(n) * sigma), l1 / (math.sqrt(n) * sigma)
    orders = np.array(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    rdp = np.minimum.reduce([orders / 2 * s ** 2 + tau * d,
                             orders / 2 * (s ** 2 + 2 * s1 * tau + tau ** 2 * d),
                             orders / 2 * (s + math.sqrt(d) * tau) ** 2]) * rounds
    return rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0]


@pytest.mark.parametrize("z, rounds", [(1.0, 1), (4.0, 40), (0.7, 100)])
def test_epsilon_equals_dp_accountings_for_the_distributed_discrete_gaussian(z, rounds):
    stage = _stage(noise_multiplier=z, dim=26_010, min_clients=450, max_clients=1000)
    assert stage.tau() == 0.0  # a 32-bit grid leaves each client's noise millions of steps
    assert stage.epsilon(rounds, 1e-5) == pytest.approx(_oracle_epsilon(stage, rounds, 1e-5),
                                                        rel=1e-9)


def test_epsilon_where_summing_discrete_gaussians_costs_something():
    """Tiny noise and few clients: each client's noise is a few grid steps, so τ > 0 and the
    three terms differ; the per-round events never claim less than the per-order minimum."""
    stage = _stage(noise_multiplier=3.5e-9, dim=500, min_clients=3, max_clients=4)
    assert 0.5 <= stage.local_std < 2 and stage.tau() > 1e-6
    oracle = _oracle_epsilon(stage, 5, 1e-5)
    assert oracle <= stage.epsilon(5, 1e-5) <= oracle * 1.05


def test_calibration_spends_the_target():
    z = calibrate_distributed(8.0, 1e-5, 40, 0.3, 26_010, 450, 1000)
    eps = DistributedDP(z, 0.3, 26_010, 450, 1000).epsilon(40, 1e-5)
    assert 7.99 <= eps <= 8.0
    # no amplification by sampling: the same z as the full-batch Gaussian under RDP
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 40))
    assert acc.get_epsilon(1e-5) == pytest.approx(eps, rel=1e-6)


# -- the coordinator's view ---------------------------------------------------------------------

D = 4000


def _update_of(client: str) -> torch.Tensor:
    v = numpy_rng(0, "ddp-view", client).standard_normal(D)
    return torch.from_numpy(v / np.linalg.norm(v) * 0.5).to(torch.float32)  # norm 0.5 < C


def _fixed_update(params, data, info):
    return ClientResult({"w": _update_of(info.client_id)}, weight=10.0)


def _coordinators_view(recorder: Recorder) -> np.ndarray:
    """What the coordinator can compute from the messages it received: the sum of the masked
    inputs minus every survivor's self-mask, rebuilt from the shares sent in unmask (no client
    dropped, so the pairwise masks cancel)."""
    total = np.zeros(D, dtype=np.uint32)
    shares: dict[str, list[tuple[int, bytes]]] = {}
    for seen in recorder.seen:
        m = seen.message
        if m.dst != COORDINATOR:
            continue
        if m.kind == MASKED_INPUT:
            total += m.tensors["masked"].numpy().view(np.uint32)
        if m.kind == UNMASK:
            for name, t in m.tensors.items():
                share = raw(t)
                shares.setdefault(name.removeprefix("b/"), []).append(
                    (int.from_bytes(share[:2], "big"), share[2:]))
    for points in shares.values():
        total -= mask_stream(combine_bytes(points, KEY_BYTES), D)
    return total


def _ten_clients() -> tuple[list[str], DistributedDP, SecureFedAvg]:
    """Ten clients c0..c9 summing fixed updates under distributed DP (n_min = 9) and secure
    aggregation: their ids, the DP stage and the algorithm."""
    ids = [f"c{i}" for i in range(10)]
    ddp = distributed_dp(1.0, 1.0, D, 9, 10)
    alg = SecureFedAvg(_fixed_update, pipeline=Pipeline([ddp, secure_aggregation()],
                                                        weighted_mean("uniform")),
                       min_replies=9, seed=0)
    return ids, ddp, alg


def test_the_coordinators_view_carries_the_noise():
    """The honest-but-curious coordinator records every message it gets and unmasks the sum
    itself: what it learns is the clipped updates' sum plus noise of the promised size, and it
    is exactly what the round applied."""
    ids, ddp, alg = _ten_clients()
    transport = InProcessTransport(ids, lambda _: None, alg.handlers())
    recorder = transport.observe(Recorder(COORDINATOR, kinds={MASKED_INPUT, UNMASK}))
    params = {"w": torch.zeros(D)}
    result = run(alg, transport, params=params, rounds=1)
    view = ddp.decode(_coordinators_view(recorder))
    clean = sum(_update_of(c).double().numpy() for c in ids)
    noise = view - clean
    assert abs(noise.std() / math.sqrt(10 / 9) - 1) < 0.05  # z C sqrt(m / n_min)
    assert np.corrcoef(view, clean)[0, 1] < 0.5  # the updates are buried (|clean| = 1.6)
    applied = result.state.params["w"].double().numpy()
    np.testing.assert_allclose(applied, view / 10, rtol=0, atol=1e-6)


def test_a_coordinator_that_shrinks_the_survivor_set_is_refused():
    """To unmask a sum of fewer noise shares than the clients agreed to, a coordinator tells
    them that most of the others dropped (after their masked inputs arrived). Every client
    refuses to sign a survivor set below its own min_clients; nothing is unmasked."""
    ids, ddp, alg = _ten_clients()
    inner = InProcessTransport(ids, lambda _: None, alg.handlers())

    def shrink(m: Message) -> Message:
        if m.kind in (CONSISTENCY, UNMASK):
            return dataclasses.replace(m, config={**m.config, "survivors": ids[:6]})
        return m

    coord = Coordinator(inner, shrink)
    state, report = alg.round(alg.init({"w": torch.zeros(D)}), coord, 1)
    assert report.failed is not None
    refused = {r.src: r.error for r in coord.replies if r.kind == CONSISTENCY}
    for who in ids[:6]:
        assert refused[who] == (f"SecAggError: secagg.consistency: client {who!r} refuses to "
                                "sign a survivor set of 6 clients: it takes part only in sums "
                                "of at least 9 inputs.")
    assert not [r for r in coord.replies if r.kind == UNMASK and r.tensors]
    assert torch.equal(state.params["w"], torch.zeros(D))


class _Drop:
    """A mod: the named clients fail their masked input in the named rounds."""

    def __init__(self, rounds: dict[int, set[str]]):
        self.rounds = rounds

    def __call__(self, message, context, next_handler):
        if message.kind == MASKED_INPUT and context.node_id in self.rounds.get(message.round, ()):
            return message.failed("simulated dropout")
        return next_handler(message, context)


def test_a_client_never_sends_its_update_without_noise():
    """Plain FedAvg with the stage: every client refuses. SecureFedAvg insists on min_replies
    of at least min_clients, and a round with fewer contributors fails, releasing nothing and
    leaving the model as it was; the next round goes on."""
    ids = ["a", "b", "c", "d"]
    ddp = distributed_dp(1.0, 1.0, D, 3, 4)
    plain = FedAvg(_fixed_update, pipeline=Pipeline([ddp], weighted_mean("uniform")))
    transport = InProcessTransport(ids, lambda _: None, plain.handlers())
    result = run(plain, transport, params={"w": torch.zeros(D)}, rounds=1)
    assert result.history[-1]["round/replied"] == 0
    with pytest.raises(AggregationError, match="min_replies = 1 is below the 3 contributors"):
        SecureFedAvg(_fixed_update, pipeline=Pipeline([ddp], weighted_mean("uniform")))
    secure = SecureFedAvg(_fixed_update, pipeline=Pipeline([ddp], weighted_mean("uniform")),
                          min_replies=3, seed=0)
    transport = InProcessTransport(ids, lambda _: None, secure.handlers(),
                                   mods=[_Drop({1: {"a", "b"}})])
    params = {"w": torch.zeros(D)}
    recorder = transport.observe(Recorder(COORDINATOR, kinds={UNMASK}))
    result = run(secure, transport, params=params, rounds=1)
    assert result.history[0]["round/failed"] == 1.0
    assert torch.equal(result.state.params["w"], params["w"])
    assert not recorder.seen  # no client was asked for a share: nothing could be unmasked
    result = run(secure, transport, params=params, rounds=2)
    assert result.history[1]["round/replied"] == 4 and "round/failed" not in result.history[1]


# -- the config ---------------------------------------------------------------------------------

DDP = ["privacy.mode=distributed", "secagg.enabled=true", "federated.weighting=uniform",
       "federated.rounds=3", "client.epochs=1", "baseline=false", "privacy.clip_norm=0.5"]


def test_a_distributed_run_reports_its_epsilon_and_what_it_trusts(tmp_path):
    config = load_config(None, DDP + ["privacy.noise_multiplier=3.0"])
    (result,) = run_experiment(config, tmp_path)
    eps = [h["dp/epsilon"] for h in result.history]
    stage = DistributedDP(3.0, 0.5, _dim(config), 9, 10)
    assert eps == pytest.approx([stage.epsilon(r, 1e-5) for r in (1, 2, 3)], rel=1e-9)
    assert "train/loss" not in result.history[-1]  # its sum would be released without noise
    privacy = json.loads((tmp_path / "summary.json").read_text())["results"][0]["privacy"]
    assert privacy["accountant"] == "rdp" and privacy["noise"] == "secret"
    assert privacy["adjacency"].startswith("one client's update replaced by zeros")
    assert privacy["protects"] == "everything one client holds, also against the coordinator"


def _dim(config) -> int:
    from shoal.data.tasks import load_task
    task = load_task(config.task.name, **config.task.options)
    return tree.numel(tree.params_of(task.model_fn()))


def test_a_distributed_run_stops_at_its_budget(tmp_path):
    config = load_config(None, DDP + ["privacy.noise_multiplier=3.0",
                                      "privacy.target_epsilon=2.3"])
    (result,) = run_experiment(config, tmp_path)  # ε after 2 rounds: 2.03, after 3: 2.54
    assert result.rounds == 2 and result.history[-1]["dp/epsilon"] <= 2.3
    assert result.stopped.startswith(f"privacy budget: round {result.rounds + 1} would raise ε")


@pytest.mark.parametrize("extra, message", [
    (["secagg.enabled=false"],
     "config [privacy]: privacy.mode = \"distributed\" (distributed DP) needs secure "
     "aggregation, which hides each update while its client's share of the noise is all it "
     "carries: set secagg.enabled = true (or privacy.mode = \"user\")."),
    (["privacy.adaptive_clipping=true"],
     "config field 'privacy.adaptive_clipping': adaptive clipping is implemented for "
     "privacy.mode = \"user\" only, so with privacy.mode = \"distributed\" it would not be "
     "applied; set privacy.adaptive_clipping = false and choose privacy.clip_norm."),
    (["privacy.accountant=pld"],
     "config [privacy]: privacy.mode = \"distributed\" (distributed DP) needs the RDP "
     "accountant (each round is a zCDP bound), but privacy.accountant = \"pld\": set "
     "privacy.accountant = \"rdp\" or \"auto\"."),
    (["privacy.min_clients=11"],
     "config [privacy]: min_clients = 11 exceeds the 10 clients a round can have; lower "
     "privacy.min_clients or sample more clients per round."),
    (["federated.weighting=examples"],
     "config [privacy]: privacy.mode = \"distributed\" (distributed DP) needs the uniform "
     "mean, but federated.reducer = \"mean\" and federated.weighting = \"examples\": set "
     "federated.reducer = \"mean\" and federated.weighting = \"uniform\"."),
])
def test_settings_distributed_dp_cannot_honour_are_refused(tmp_path, extra, message):
    config = load_config(None, DDP + ["privacy.noise_multiplier=3.0", *extra])
    with pytest.raises(ConfigError) as e:
        run_experiment(config, tmp_path)
    assert str(e.value) == message
