"""shoal's accountant equals dp-accounting's; calibration hits its target within 1 %."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from shoal.errors import ConfigError
from shoal.privacy.accounting import calibrate_noise_multiplier, epsilon, gaussian_event

GRID = [  # (q, sigma, steps, delta)
    (0.01, 1.1, 10_000, 1e-5),
    (0.05, 2.0, 500, 1e-6),
    (0.1, 0.8, 100, 1e-5),
    (1.0, 5.0, 20, 1e-3),
]


def _reference(q: float, sigma: float, steps: int, delta: float, kind: str) -> float:
    """ε straight from dp-accounting, written out without shoal."""
    event = (dp_accounting.GaussianDpEvent(sigma) if q == 1 else
             dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    acc = pld.PLDAccountant() if kind == "pld" else rdp.RdpAccountant()
    acc.compose(event, steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), GRID)
def test_epsilon_equals_dp_accounting(q, sigma, steps, delta, kind):
    ours = epsilon(gaussian_event(sigma, q, steps), delta, kind)
    assert ours == pytest.approx(_reference(q, sigma, steps, delta, kind), rel=1e-9)


def test_known_values_q001_sigma11_10k_steps():
    event = gaussian_event(1.1, 0.01, 10_000)
    assert epsilon(event, 1e-5, "pld") == pytest.approx(5.19, abs=0.01)
    assert epsilon(event, 1e-5, "rdp") == pytest.approx(5.63, abs=0.01)
    assert epsilon(event, 1e-5) == epsilon(event, 1e-5, "pld")  # PLD is the default


def test_fixed_size_sampling_is_replace_one_without_replacement_rdp():
    ours = epsilon(gaussian_event(2.0, 0.1, 50, sampling="fixed", population=1000), 1e-5,
                   "rdp", "fixed")
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    # Replacing one client moves a sum of C-clipped updates by 2C: multiplier z / 2.
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        1000, 100, dp_accounting.GaussianDpEvent(1.0)), 50)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


def test_pld_refuses_fixed_size_cohorts_with_the_fix():
    with pytest.raises(ConfigError) as e:
        epsilon(gaussian_event(2.0, 0.1, 5, sampling="fixed", population=100), 1e-5, "pld",
                "fixed")
    assert str(e.value) == (
        "accountant 'pld' cannot account fixed-size cohorts (sampling without replacement); "
        "use the 'rdp' accountant, or Poisson sampling (federated.sampling = \"poisson\" with "
        "clients_per_round a fraction).")


def test_epsilon_grows_with_steps_and_falls_with_noise():
    e = [epsilon(gaussian_event(1.0, 0.02, s), 1e-5) for s in (10, 100, 1000)]
    assert e[0] < e[1] < e[2]
    assert epsilon(gaussian_event(2.0, 0.02, 100), 1e-5) < e[1]


@pytest.mark.parametrize(("target", "steps", "q", "kind"), [
    (1.0, 100, 0.1, "rdp"), (8.0, 1000, 0.01, "rdp"), (1.0, 50, 0.1, "pld"),
    pytest.param(3.0, 1000, 0.01, "pld", marks=pytest.mark.slow),
])
def test_calibration_hits_target_within_one_percent(target, steps, q, kind):
    z = calibrate_noise_multiplier(target, 1e-5, steps, q, accountant=kind)
    spent = epsilon(gaussian_event(z, q, steps), 1e-5, kind)
    assert target * 0.99 <= spent <= target * (1 + 1e-6)


def test_calibration_for_fixed_size_cohorts():
    z = calibrate_noise_multiplier(2.0, 1e-5, 30, 0.1, accountant="rdp", sampling="fixed",
                                   population=200)
    spent = epsilon(gaussian_event(z, 0.1, 30, sampling="fixed", population=200), 1e-5, "rdp",
                    "fixed")
    assert 2.0 * 0.99 <= spent <= 2.0 * (1 + 1e-6)


def test_calibration_refuses_a_target_too_loose():
    with pytest.raises(ConfigError) as e:
        calibrate_noise_multiplier(1000.0, 1e-5, 10, 0.01)
    assert str(e.value) == (
        "calibrate_noise_multiplier: even noise multiplier 0.25 spends no more than ε = 1000.0 "
        "at δ = 1e-05 in 10 steps at sampling rate 0.01; the target is too loose to calibrate "
        "(lower target_epsilon, or set the noise multiplier yourself).")


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match=r"noise_multiplier must be > 0 \(got 0\)"):
        gaussian_event(0, 0.1, 10)
    with pytest.raises(ConfigError, match=r"sampling_rate must be in \(0, 1\] \(got 1.5\)"):
        gaussian_event(1.0, 1.5, 10)
    with pytest.raises(ConfigError, match=r"delta must be in \(0, 1\) \(got 0\)"):
        epsilon(gaussian_event(1.0, 0.1, 10), 0)
