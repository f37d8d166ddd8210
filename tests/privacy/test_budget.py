"""ε in every round, the budget stop, per-client accountants rebuilt from the seed."""

from __future__ import annotations

import dp_accounting
import pytest
import torch.nn.functional as F
from dp_accounting import pld, rdp

from shoal import tree
from shoal.aggregate import Pipeline, weighted_mean
from shoal.algorithms.cohort import cohort
from shoal.algorithms.fedavg import FedAvg
from shoal.client import local_sgd
from shoal.privacy import PrivacyAccounting, SampleLevelLedger, UserLevelLedger, dp_fedavg, dp_sgd
from shoal.privacy.budget import cohort_sampling
from shoal.run import run
from shoal.sim import InProcessTransport

from ..conftest import cross_entropy, make_tiny, sgd


def _epsilon(q: float, z: float, count: int, kind: str = "rdp", delta: float = 1e-5) -> float:
    acc = pld.PLDAccountant() if kind == "pld" else rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count)
    return acc.get_epsilon(delta)


def _user_level(z: float = 1.0, q: float = 0.5, clients: int = 6):
    tiny = make_tiny(clients=clients)
    model = tiny.model()
    coh = cohort(q, "poisson")
    fedavg = FedAvg(local_sgd(model, cross_entropy, batch_size=8, optimizer=sgd(0.1)),
                    pipeline=Pipeline([dp_fedavg(z, 0.1, coh)], weighted_mean("uniform")),
                    cohort=coh, seed=5)
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, fedavg.handlers())
    return fedavg, transport, tree.params_of(model)


def test_budget_stops_before_the_round_that_would_exceed_it():
    z, q = 2.0, 0.5
    eps = [_epsilon(q, z, r, "pld") for r in range(1, 8)]
    target = (eps[2] + eps[3]) / 2  # rounds 1..3 fit, round 4 would not
    fedavg, transport, params = _user_level(z, q)
    cb = PrivacyAccounting(UserLevelLedger(z, fedavg.cohort), 1e-5, target_epsilon=target)
    result = run(fedavg, transport, params=params, rounds=7, callbacks=[cb])
    assert result.rounds == 3
    assert [h["dp/epsilon"] for h in result.history] == pytest.approx(eps[:3], rel=1e-9)
    assert all(h["dp/delta"] == 1e-5 for h in result.history)
    assert result.stopped == (
        f"privacy budget: round 4 would raise ε to {eps[3]:.3f} > target ε = {target:g} "
        f"(δ = 1e-05); stopped after round 3 at ε = {eps[2]:.3f}")


def test_without_budget_every_round_reports_epsilon():
    fedavg, transport, params = _user_level()
    cb = PrivacyAccounting(UserLevelLedger(1.0, fedavg.cohort, "rdp"), 1e-5)
    result = run(fedavg, transport, params=params, rounds=3, callbacks=[cb])
    assert result.rounds == 3 and result.stopped is None
    e = [h["dp/epsilon"] for h in result.history]
    assert e[0] < e[1] < e[2]


def test_accounting_assumes_the_sampling_the_simulator_does():
    """The ledger reads the algorithm's own cohort; Poisson cohorts include each client with
    probability q (checked over many rounds), fixed ones draw exactly k without replacement."""
    assert cohort_sampling(cohort(0.1, "poisson"), 1000) == (0.1, "poisson")
    assert cohort_sampling(cohort(50), 1000) == (0.05, "fixed")
    assert cohort_sampling(cohort(None), 1000) == (1.0, "poisson")
    ids = [f"c{i}" for i in range(200)]
    poisson = cohort(0.1, "poisson")
    sizes = [len(poisson.sample(ids, 0, r)) for r in range(1, 401)]
    mean = sum(sizes) / len(sizes)
    assert mean == pytest.approx(20, abs=5 * (200 * 0.1 * 0.9) ** 0.5 / 20)
    assert len(set(sizes)) > 5  # Poisson: the cohort size varies
    fixed = cohort(20)
    for r in range(1, 50):
        chosen = fixed.sample(ids, 0, r)
        assert len(chosen) == len(set(chosen)) == 20


def _sample_level(clients: int = 4, q: float = 0.5):
    tiny = make_tiny(clients=clients, per_client=30)
    model = tiny.model()
    update = dp_sgd(model, F.cross_entropy, noise_multiplier=1.2, max_grad_norm=1.0,
                    batch_size=5, epochs=1, optimizer=sgd(0.1), grad_sample_mode="hooks",
                    reproducible=True)  # bit-identical runs (see test_resume below)
    fedavg = FedAvg(update, cohort=cohort(q, "poisson"), seed=2)
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, fedavg.handlers())
    ledger = SampleLevelLedger(update, lambda c: len(tiny.data[c].train), fedavg.cohort,
                               fedavg.seed, "rdp")
    return fedavg, transport, tree.params_of(model), ledger, update


def test_each_client_composes_its_own_rounds_and_the_run_reports_the_worst():
    fedavg, transport, params, ledger, update = _sample_level()
    cb = PrivacyAccounting(ledger, 1e-5)
    result = run(fedavg, transport, params=params, rounds=4, callbacks=[cb])
    taken = {c: 0 for c in transport.nodes()}
    for r in range(1, 5):
        for c in fedavg.cohort.sample(transport.nodes(), fedavg.seed, r):
            taken[c] += 1
        # 25 examples each: q = 5/25, 5 steps per round.
        worst = max(_epsilon(0.2, 1.2, 5 * k) for k in taken.values() if k)
        assert result.history[r - 1]["dp/epsilon"] == pytest.approx(worst, rel=1e-9)
    assert ledger.participation(transport.nodes(), 4) == {c: k for c, k in taken.items() if k}
    assert len(set(taken.values())) > 1  # clients took part in different numbers of rounds


def test_client_accountants_survive_a_resume():
    """A fresh ledger (as after a restart) rebuilt from the seed reports the same ε as the
    uninterrupted run, and the budget stops at the same round."""
    fedavg, transport, params, ledger, _ = _sample_level()
    full = run(fedavg, transport, params=params, rounds=6,
               callbacks=[PrivacyAccounting(ledger, 1e-5, target_epsilon=12.0)])
    fedavg2, transport2, params2, ledger2, _ = _sample_level()
    first = run(fedavg2, transport2, params=params2, rounds=2,
                callbacks=[PrivacyAccounting(ledger2, 1e-5, target_epsilon=12.0)])
    _, _, _, ledger3, _ = _sample_level()
    resumed = run(fedavg2, transport2, state=first.state, start_round=3, history=first.history,
                  rounds=6, callbacks=[PrivacyAccounting(ledger3, 1e-5, target_epsilon=12.0)])
    assert [h["dp/epsilon"] for h in resumed.history] == [h["dp/epsilon"] for h in full.history]
    assert (resumed.rounds, resumed.stopped) == (full.rounds, full.stopped)
    assert tree.equal(fedavg.params(full.state), fedavg2.params(resumed.state))
