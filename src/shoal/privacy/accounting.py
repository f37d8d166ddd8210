"""Privacy accounting with dp-accounting: DP events, ε for a δ, and noise calibration.

A Gaussian mechanism run ``steps`` times on a subsample is one :class:`dp_accounting.DpEvent`:

* ``sampling="poisson"``: each record (example or client) is included independently with
  probability ``q``; neighbouring datasets differ by adding or removing one record.
* ``sampling="fixed"``: exactly ``size`` of ``population`` records drawn uniformly without
  replacement; neighbouring datasets differ by *replacing* one record (the relation under which
  this sampling amplifies privacy, Wang et al. 2019). Replacing a record moves a sum of
  vectors clipped to norm C by up to 2C, so the Gaussian's noise multiplier relative to that
  sensitivity is half the one relative to C. Only the RDP accountant handles this event.

``epsilon`` asks a fresh dp-accounting accountant (PLD by default, RDP on request) for ε at δ;
``calibrate_noise_multiplier`` searches the noise multiplier that spends a target ε.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp

from ..errors import ConfigError

__all__ = ["MIN_PLD_NOISE", "AccountantKind", "Sampling", "calibrate_noise_multiplier",
           "check_noise", "epsilon", "gaussian_event", "make_accountant", "neighboring_relation"]

AccountantKind = Literal["pld", "rdp"]
Sampling = Literal["poisson", "fixed"]

_REL = dp_accounting.NeighboringRelation
MIN_PLD_NOISE = 0.25
"""Below this noise multiplier the PLD accountant's discretisation needs tens of GiB; no useful
DP run uses it (see :func:`check_noise`)."""
_MIN_NOISE = MIN_PLD_NOISE


def gaussian_event(noise_multiplier: float, sampling_rate: float, steps: int, *,
                   sampling: Sampling = "poisson", population: int | None = None,
                   ) -> dp_accounting.DpEvent:
    """``steps`` compositions of a subsampled Gaussian mechanism as a dp-accounting event.

    ``noise_multiplier`` is the noise's standard deviation over the clipping norm C.
    ``sampling_rate`` is ``q`` (Poisson) or ``size / population`` (fixed; then ``population``
    is required and ``size = round(q * population)``). ``q = 1`` is the full-batch mechanism.
    """
    if not noise_multiplier > 0:
        raise ConfigError(f"gaussian_event: noise_multiplier must be > 0 (got {noise_multiplier}).")
    if not 0 < sampling_rate <= 1:
        raise ConfigError(f"gaussian_event: sampling_rate must be in (0, 1] (got {sampling_rate}).")
    if steps < 0:
        raise ConfigError(f"gaussian_event: steps must be >= 0 (got {steps}).")
    if sampling not in ("poisson", "fixed"):
        raise ConfigError(f"gaussian_event: sampling must be 'poisson' or 'fixed' "
                          f"(got {sampling!r}).")
    if steps == 0:
        return dp_accounting.NoOpDpEvent()
    if sampling == "poisson":
        one: dp_accounting.DpEvent = (
            dp_accounting.GaussianDpEvent(noise_multiplier) if sampling_rate == 1 else
            dp_accounting.PoissonSampledDpEvent(sampling_rate,
                                                dp_accounting.GaussianDpEvent(noise_multiplier)))
    else:
        if population is None or population < 1:
            raise ConfigError("gaussian_event: fixed-size sampling needs the population size "
                              f"(got {population!r}); pass population=N.")
        size = max(1, round(sampling_rate * population))
        # Replace-one adjacency: sensitivity 2C, so the multiplier relative to it is z / 2.
        one = dp_accounting.SampledWithoutReplacementDpEvent(
            population, size, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
    return dp_accounting.SelfComposedDpEvent(one, steps)


def check_noise(noise_multiplier: float, accountant: AccountantKind) -> None:
    """Refuse, up front, a noise multiplier ``accountant`` cannot account: below
    :data:`MIN_PLD_NOISE` the PLD accountant's discretisation needs tens of GiB (it would run a
    round and then die of memory)."""
    if accountant == "pld" and noise_multiplier < MIN_PLD_NOISE:
        raise ConfigError(
            f"privacy: noise multiplier {noise_multiplier:g} is below {MIN_PLD_NOISE}, where the "
            "PLD accountant's privacy-loss distribution needs tens of GiB to discretise (and "
            "such a run gives no meaningful privacy); use privacy.accountant = \"rdp\", or a "
            f"noise multiplier of at least {MIN_PLD_NOISE}.")


def neighboring_relation(sampling: Sampling) -> dp_accounting.NeighboringRelation:
    """The adjacency an accountant must use for events of this sampling (see module doc)."""
    return _REL.REPLACE_ONE if sampling == "fixed" else _REL.ADD_OR_REMOVE_ONE


def make_accountant(kind: AccountantKind = "pld", sampling: Sampling = "poisson",
                    ) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant of ``kind`` for events of ``sampling``."""
    if kind not in ("pld", "rdp"):
        raise ConfigError(f"accountant must be 'pld' or 'rdp' (got {kind!r}).")
    if kind == "pld":
        if sampling == "fixed":
            raise ConfigError(
                "accountant 'pld' cannot account fixed-size cohorts (sampling without "
                "replacement); use the 'rdp' accountant, or Poisson sampling "
                "(federated.sampling = \"poisson\" with clients_per_round a fraction)."
            )
        return pld.PLDAccountant(neighboring_relation=neighboring_relation(sampling))
    return rdp.RdpAccountant(neighboring_relation=neighboring_relation(sampling))


def epsilon(event: dp_accounting.DpEvent, delta: float, accountant: AccountantKind = "pld",
            sampling: Sampling = "poisson") -> float:
    """ε at ``delta`` of ``event`` (from :func:`gaussian_event`) by a fresh accountant."""
    if not 0 < delta < 1:
        raise ConfigError(f"epsilon: delta must be in (0, 1) (got {delta}).")
    acc = make_accountant(accountant, sampling)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


@contextlib.contextmanager
def _quiet_rdp() -> Iterator[None]:
    """Silence dp-accounting's RDP warnings about orders it drops (they do not matter to a
    search), restoring the previous logging level after."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, steps: int,
                               sampling_rate: float, *, accountant: AccountantKind = "pld",
                               sampling: Sampling = "poisson", population: int | None = None,
                               tol: float = 1e-4) -> float:
    """The smallest noise multiplier whose ``steps`` subsampled Gaussian steps spend at most
    ``target_epsilon`` at ``delta``, found by dp-accounting's ``calibrate_dp_mechanism`` to
    within ``tol`` in the multiplier (the ε it spends is then within 0.1 % of the target).

    >>> calibrate_noise_multiplier(3.0, 1e-5, steps=1000, sampling_rate=0.01)  # about 0.9
    """
    if not target_epsilon > 0:
        raise ConfigError(f"calibrate_noise_multiplier: target_epsilon must be > 0 "
                          f"(got {target_epsilon}).")
    if steps < 1:
        raise ConfigError(f"calibrate_noise_multiplier: steps must be >= 1 (got {steps}).")
    make_accountant(accountant, sampling)  # fail early on an impossible combination

    def event(z: float) -> dp_accounting.DpEvent:
        return gaussian_event(z, sampling_rate, steps, sampling=sampling, population=population)

    def eps(z: float, kind: AccountantKind) -> float:
        return epsilon(event(z), delta, kind, sampling)

    too_loose = ConfigError(
        f"calibrate_noise_multiplier: even noise multiplier {_MIN_NOISE} spends no more "
        f"than ε = {target_epsilon} at δ = {delta} in {steps} steps at sampling rate "
        f"{sampling_rate}; the target is too loose to calibrate (lower target_epsilon, or "
        "set the noise multiplier yourself)."
    )
    with _quiet_rdp():
        loose = eps(_MIN_NOISE, "rdp") <= target_epsilon  # RDP bounds PLD from above; fast
    if loose:
        raise too_loose
    # RDP is fast and never tighter than PLD, so its answer bounds PLD's from above; PLD then
    # searches only between 0.5x and 1x of it.
    bracket: dp_accounting.LowerEndpointAndGuess | dp_accounting.ExplicitBracketInterval = \
        dp_accounting.LowerEndpointAndGuess(_MIN_NOISE, 1.0)
    if accountant == "pld":
        with _quiet_rdp():
            upper = calibrate_noise_multiplier(target_epsilon, delta, steps, sampling_rate,
                                               accountant="rdp", sampling=sampling,
                                               population=population, tol=tol)
        bracket = dp_accounting.ExplicitBracketInterval(max(_MIN_NOISE, 0.5 * upper), upper)
    try:
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant, sampling), event, target_epsilon, delta,
            bracket_interval=bracket, tol=tol)
    except ValueError as e:  # no sign change in the bracket
        if not isinstance(bracket, dp_accounting.ExplicitBracketInterval) \
                or bracket.endpoint_1 <= _MIN_NOISE:
            raise too_loose from e
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant, sampling), event, target_epsilon, delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(_MIN_NOISE,
                                                                   bracket.endpoint_2), tol=tol)
    return float(z)
