"""From a config's ``[privacy]`` section to the DP pieces of a federated run.

``build_federated`` (in :mod:`shoal.experiment`) asks this module for the DP-SGD client update
(``mode = "sample"``), the DP-FedAvg stage (``mode = "user"``), the distributed-DP stage
(``mode = "distributed"``, inside secure aggregation) and the accounting callback. When
``noise_multiplier = 0`` the noise is calibrated so the planned rounds spend ``target_epsilon``:
for DP-FedAvg over the cohort's sampling; for distributed DP over every round (no sampling
amplification); for DP-SGD for the smallest client (the largest sampling rate) as if it took
part in every round, a bound on every client.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

from torch import nn

from ..algorithms.cohort import Cohort
from ..client import LossFn, OptimizerFn
from ..config import Config
from ..errors import ConfigError
from .accounting import MIN_PLD_NOISE, AccountantKind, calibrate_noise_multiplier
from .budget import (
    DistributedLedger,
    PrivacyAccounting,
    SampleLevelLedger,
    UserLevelLedger,
    cohort_sampling,
)
from .distributed import DistributedDP, calibrate_distributed
from .dpfedavg import DPFedAvg
from .dpsgd import DPSGD

__all__ = ["accountant_of", "budget_problem", "dp_callback", "dp_client_update", "dp_stage",
           "noise_for", "privacy_problems", "privacy_summary"]

log = logging.getLogger(__name__)


def _check(config: Config) -> None:
    p = config.privacy
    if p.mode != "off" and p.noise_multiplier == 0 and p.target_epsilon == 0:
        raise ConfigError(
            f"config [privacy]: mode = {p.mode!r} needs noise: set privacy.noise_multiplier "
            "> 0, or privacy.target_epsilon > 0 to calibrate it to the planned rounds."
        )


def _uniform_mean(config: Config) -> str | None:
    f = config.federated
    if f.reducer == "mean" and f.weighting == "uniform":
        return None
    return (f"the uniform mean, but federated.reducer = \"{f.reducer}\" and "
            f"federated.weighting = \"{f.weighting}\": set federated.reducer = \"mean\" and federated.weighting = "
            "\"uniform\"")


def _requirements(config: Config, what: str, lacks: list[str]) -> list[str]:
    if not lacks:
        return []
    if len(lacks) == 1:
        return [f"config [privacy]: privacy.mode = \"{config.privacy.mode}\" ({what}) needs "
                f"{lacks[0]}."]
    listed = "; ".join(f"({i}) {x}" for i, x in enumerate(lacks, 1))
    return [f"config [privacy]: privacy.mode = \"{config.privacy.mode}\" ({what}) needs "
            f"{len(lacks)} things this config lacks: {listed}."]


def privacy_problems(config: Config, population: int | None = None) -> list[str]:
    """Every problem of the ``[privacy]`` section that would stop a run or leave a setting
    unapplied, found before anything runs; each names the config fields to change, and the
    requirements of one mode come together in one message. ``population``: the number of
    clients, when known (it decides whether a fixed-size cohort is everyone)."""
    p, f = config.privacy, config.federated
    if p.mode == "off":
        unused = [(name, value) for name, value, default in (
            ("target_epsilon", p.target_epsilon, 0.0),
            ("noise_multiplier", p.noise_multiplier, 0.0),
            ("adaptive_clipping", p.adaptive_clipping, False)) if value != default]
        return [f"config field 'privacy.{name}': {_toml(value)} is set, but privacy.mode = "
                "\"off\" trains without differential privacy, so it would not be applied; set "
                "privacy.mode = \"sample\", \"user\" or \"distributed\", or remove the field."
                for name, value in unused]
    out: list[str] = []
    noise = (None if p.noise_multiplier > 0 or p.target_epsilon > 0 else
             "noise: set privacy.noise_multiplier > 0, or privacy.target_epsilon > 0 to "
             "calibrate it to the planned rounds")
    if p.mode != "distributed":
        accountant: AccountantKind = "pld" if p.accountant == "auto" else p.accountant
        if p.noise_multiplier > 0 and accountant == "pld" and \
                p.noise_multiplier < MIN_PLD_NOISE:
            out.append(
                f"config field 'privacy.noise_multiplier': {p.noise_multiplier:g} is below "
                f"{MIN_PLD_NOISE}, where the PLD accountant's privacy-loss distribution needs "
                "tens of GiB to discretise (and such a run gives no meaningful privacy); set "
                f"privacy.accountant = \"rdp\", or privacy.noise_multiplier >= {MIN_PLD_NOISE}.")
    if p.mode != "user" and p.adaptive_clipping:
        out.append(
            f"config field 'privacy.adaptive_clipping': adaptive clipping is implemented for "
            f"privacy.mode = \"user\" only, so with privacy.mode = \"{p.mode}\" it would not be applied; "
            "set privacy.adaptive_clipping = false and choose privacy.clip_norm.")
    if p.mode == "sample":
        out += _requirements(config, "DP-SGD", [x for x in [noise] if x])
    elif p.mode == "user":
        lacks = [x for x in [noise] if x]
        fixed = f.sampling == "fixed" and not (
            f.clients_per_round == 1.0 or (population is not None and isinstance(
                f.clients_per_round, int) and f.clients_per_round >= population))
        if fixed and accountant == "pld":
            lacks.append(
                "a cohort the accountant can account: federated.sampling = \"fixed\" draws "
                "cohorts of a fixed size, which only the RDP accountant accounts, but "
                f"privacy.accountant = \"{p.accountant}\" is PLD: set federated.sampling = "
                "\"poisson\" (with a fraction in federated.clients_per_round, e.g. 0.5) or "
                "privacy.accountant = \"rdp\"")
        if (mean := _uniform_mean(config)) is not None:
            lacks.append(mean)
        out += _requirements(config, "DP-FedAvg", lacks)
    else:
        lacks = [x for x in [noise] if x]
        if not config.secagg.enabled:
            lacks.append("secure aggregation, which hides each update while its client's "
                         "share of the noise is all it carries: set secagg.enabled = true (or "
                         "privacy.mode = \"user\")")
        if (mean := _uniform_mean(config)) is not None:
            lacks.append(mean)
        if p.accountant == "pld":
            lacks.append("the RDP accountant (each round is a zCDP bound), but "
                         "privacy.accountant = \"pld\": set privacy.accountant = \"rdp\" or "
                         "\"auto\"")
        out += _requirements(config, "distributed DP", lacks)
        if population is not None and not out:
            try:
                _clients_bounds(config, population)
            except ConfigError as e:
                out.append(str(e))
    return out


def _toml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}"


def budget_problem(config: Config, client_ids: Sequence[str],
                   num_examples: Callable[[str], int], dim: int) -> str | None:
    """Why ``privacy.target_epsilon`` would stop the run before its first round (the first
    round alone would spend more), with the noise multiplier that fits the budget over the
    planned rounds; ``None`` if round 1 fits (or there is no budget, or the noise is
    calibrated to it). ``client_ids`` and ``num_examples`` describe the federation, ``dim``
    the number of model parameters."""
    p, f = config.privacy, config.federated
    if p.mode == "off" or p.target_epsilon <= 0 or p.noise_multiplier <= 0:
        return None
    population = len(client_ids)
    accountant = accountant_of(config)
    cohort = Cohort(f.clients_per_round, f.sampling)
    ledger: Any
    if p.mode == "user":
        ledger = UserLevelLedger(p.noise_multiplier, cohort, accountant)
    elif p.mode == "distributed":
        least, largest = _clients_bounds(config, population)
        ledger = DistributedLedger(DistributedDP(p.noise_multiplier, p.clip_norm, dim, least,
                                                 largest))
    else:
        ledger = SampleLevelLedger(_probe(config, p.noise_multiplier), num_examples, cohort,
                                   config.seed, accountant)
    ctx: Any = SimpleNamespace(transport=SimpleNamespace(nodes=lambda: list(client_ids)))
    first = ledger.epsilon_after(ctx, 1, p.delta)
    if first <= p.target_epsilon:
        return None
    smallest = min((num_examples(c) for c in client_ids), default=1)
    fit = noise_for(dataclasses.replace(config, privacy=dataclasses.replace(
        p, noise_multiplier=0.0)), population, smallest, dim)
    fit = math.ceil(fit * 100) / 100
    return (f"config field 'privacy.target_epsilon': the budget ε = {p.target_epsilon:g} "
            f"(δ = {p.delta:g}) is spent before round 1: with privacy.noise_multiplier = "
            f"{p.noise_multiplier:g} the first round alone would raise ε to {first:.3g} "
            f"({accountant.upper()} accountant), so the run would stop without training. "
            f"privacy.noise_multiplier = {fit:.2f} spends at most ε = {p.target_epsilon:g} over "
            f"the {f.rounds} planned rounds (federated.rounds): set it, or "
            "privacy.noise_multiplier = 0 to calibrate it, or raise privacy.target_epsilon.")


def _probe(config: Config, noise_multiplier: float) -> DPSGD:
    """A DP-SGD client update with the config's batching, for its steps and sampling rate."""
    c = config.client
    return DPSGD(nn.Linear(1, 1), lambda o, t: o.sum(), noise_multiplier=noise_multiplier,
                 max_grad_norm=1.0, batch_size=c.batch_size, epochs=c.epochs,
                 max_steps=c.max_steps or None)


def accountant_of(config: Config) -> AccountantKind:
    """The accountant the run uses: ``privacy.accountant``, where ``"auto"`` is RDP for
    distributed DP (its events are zCDP bounds) and PLD otherwise."""
    p = config.privacy
    if p.accountant == "auto":
        return "rdp" if p.mode == "distributed" else "pld"
    if p.mode == "distributed" and p.accountant != "rdp":
        raise ConfigError(
            f"config [privacy]: mode = 'distributed' is accounted by the RDP accountant (each "
            f"round is a zCDP bound), not {p.accountant!r}; set privacy.accountant = \"rdp\" "
            "or \"auto\".")
    return p.accountant


def _clients_bounds(config: Config, population: int) -> tuple[int, int]:
    """Distributed DP's ``(min_clients, max_clients)``: ``privacy.min_clients`` (or 90 % of the
    expected cohort after dropouts), and the largest cohort the sampling can draw."""
    p, f = config.privacy, config.federated
    cohort = Cohort(f.clients_per_round, f.sampling)
    largest = (population if cohort.size is None or f.sampling == "poisson"
               else min(population, round(cohort.expected_size(population))))
    least = p.min_clients or max(2, math.floor(0.9 * cohort.expected_size(population)
                                               * (1 - f.dropout)))
    if least > largest:
        raise ConfigError(
            f"config [privacy]: min_clients = {least} exceeds the {largest} clients a round can "
            "have; lower privacy.min_clients or sample more clients per round.")
    return least, largest


def noise_for(config: Config, population: int,
              smallest_client: int | None = None, dim: int = 0) -> float:
    """The noise multiplier of the run: the configured one, or one calibrated to spend
    ``target_epsilon`` at ``delta`` in ``federated.rounds`` rounds (``dim``: the number of
    model parameters, which distributed DP's accounting needs)."""
    _check(config)
    p, f = config.privacy, config.federated
    accountant = accountant_of(config)
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    if p.mode == "distributed":
        least, largest = _clients_bounds(config, population)
        z = calibrate_distributed(p.target_epsilon, p.delta, f.rounds, p.clip_norm, dim, least,
                                  largest)
    elif p.mode == "user":
        rate, sampling = cohort_sampling(Cohort(f.clients_per_round, f.sampling), population)
        z = calibrate_noise_multiplier(p.target_epsilon, p.delta, f.rounds, rate,
                                       accountant=accountant, sampling=sampling,
                                       population=population)
    else:
        n = max(smallest_client or 1, 1)
        probe = _probe(config, 1.0)
        z = calibrate_noise_multiplier(p.target_epsilon, p.delta,
                                       probe.steps(n) * f.rounds, probe.sampling_rate(n),
                                       accountant=accountant)
    log.info("privacy: noise multiplier %.4f calibrated to ε = %g at δ = %g over %d rounds",
             z, p.target_epsilon, p.delta, f.rounds)
    return z


def dp_client_update(config: Config, model: nn.Module, loss_fn: LossFn,
                     optimizer: OptimizerFn, noise_multiplier: float) -> DPSGD | None:
    """The DP-SGD client update for ``mode = "sample"`` (else ``None``)."""
    p, c = config.privacy, config.client
    if p.mode != "sample":
        return None
    return DPSGD(model, loss_fn, noise_multiplier=noise_multiplier, max_grad_norm=p.clip_norm,
                 batch_size=c.batch_size, epochs=c.epochs, max_steps=c.max_steps or None,
                 optimizer=optimizer, grad_sample_mode=p.grad_sample_mode,
                 reproducible=p.reproducible)


def dp_stage(config: Config, cohort: Cohort, noise_multiplier: float, population: int = 0,
             dim: int = 0) -> DPFedAvg | DistributedDP | None:
    """The DP-FedAvg stage for ``mode = "user"``, the distributed-DP stage for ``mode =
    "distributed"`` (it needs the ``population`` and ``dim``, the number of model
    parameters), else ``None``."""
    p, f = config.privacy, config.federated
    if p.mode not in ("user", "distributed"):
        return None
    if f.reducer != "mean" or f.weighting != "uniform":
        raise ConfigError(
            f"config [privacy]: mode = {p.mode!r} "
            f"({'DP-FedAvg' if p.mode == 'user' else 'distributed DP'}) needs the uniform "
            f"mean, but "
            f"federated.reducer = {f.reducer!r} and federated.weighting = {f.weighting!r}; set "
            "federated.reducer = \"mean\" and federated.weighting = \"uniform\"."
        )
    if p.mode == "user":
        return DPFedAvg(noise_multiplier, p.clip_norm, cohort, adaptive=p.adaptive_clipping,
                        target_quantile=p.target_quantile, clip_lr=p.clip_lr,
                        count_stddev=p.count_stddev or None, reproducible=p.reproducible)
    if not config.secagg.enabled:
        raise ConfigError(
            "config [privacy]: mode = 'distributed' adds each client's share of the noise "
            "before secure aggregation, and without it every client's update would be seen "
            "with only its own share; set secagg.enabled = true (or use mode = \"user\").")
    if p.adaptive_clipping:
        raise ConfigError(
            "config [privacy]: adaptive_clipping is not implemented for mode = 'distributed' "
            "(the clipped-count bit would need noise of its own); set "
            "privacy.adaptive_clipping = false and choose privacy.clip_norm.")
    least, largest = _clients_bounds(config, population)
    log.info("privacy: distributed DP with the noise of at least %d clients in every sum "
             "(rounds with fewer contributors fail), up to %d per round", least, largest)
    return DistributedDP(noise_multiplier, p.clip_norm, dim, least, largest,
                         reproducible=p.reproducible)


def dp_callback(config: Config, algorithm: Any, population: int,
                num_examples: Callable[[str], int]) -> PrivacyAccounting | None:
    """The accounting callback (``dp/epsilon`` every round; the budget) of ``algorithm``, a
    FedAvg built with :func:`dp_client_update` or :func:`dp_stage` (or a swarm whose peers
    run DP-SGD); it accounts the very cohort sampling and seed the algorithm uses (its
    ``client_update``, ``cohort``, ``seed`` and ``pipeline``)."""
    p = config.privacy
    if p.mode == "off":
        return None
    budget = p.target_epsilon or None
    accountant = accountant_of(config)
    if p.mode == "distributed":
        ddp = next(s for s in algorithm.pipeline.stages if isinstance(s, DistributedDP))
        return PrivacyAccounting(DistributedLedger(ddp), p.delta, budget)
    if p.mode == "user":
        stage = next(s for s in algorithm.pipeline.stages if isinstance(s, DPFedAvg))
        ledger = UserLevelLedger(stage.noise_multiplier, algorithm.cohort, accountant)
        ledger.check(population)
        return PrivacyAccounting(ledger, p.delta, budget)
    update = algorithm.client_update
    assert isinstance(update, DPSGD)
    return PrivacyAccounting(
        SampleLevelLedger(update, num_examples, algorithm.cohort, algorithm.seed, accountant),
        p.delta, budget)


def privacy_summary(config: Config, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What a run's results say about privacy: the mode, ε at δ after the last round with the
    accountant and adjacency it was computed under, what it protects, whom it trusts, and
    whether the noise was secret (``{}`` without DP)."""
    p, f = config.privacy, config.federated
    if p.mode == "off":
        return {}
    eps = next((h["dp/epsilon"] for h in reversed(history) if "dp/epsilon" in h), None)
    if p.mode == "distributed":
        adjacency = ("one client's update replaced by zeros (it still adds its share of the "
                     "noise); no amplification by sampling, as the coordinator picks the cohort")
        protects = "everything one client holds, also against the coordinator"
        trusts = ("that every released sum holds the noise of at least min_clients clients "
                  "that follow the protocol (a coordinator colluding with clients removes "
                  "their shares); the coordinator sees only the noisy sum")
    elif p.mode == "user":
        adjacency = "add or remove one client" if f.sampling == "poisson" \
            else "replace one client"
        protects = "everything one client holds"
        trusts = ("the coordinator adds the noise to the exact (clipped) sum, which it sees; "
                  "with secure aggregation it sees only that sum, not one update")
    else:
        adjacency = "add or remove one example of one client"
        protects = "each training example of each client"
        trusts = "only the client itself: it adds the noise before its update leaves it"
    if p.reproducible:
        trusts = "everyone who holds the config: the noise derives from the run's seed"
    out: dict[str, Any] = {
        "mode": p.mode, "epsilon": eps, "delta": p.delta, "accountant": accountant_of(config),
        "adjacency": adjacency, "protects": protects, "trusts": trusts,
        "noise": "reproducible" if p.reproducible else "secret",
    }
    if p.reproducible:
        out["warning"] = ("privacy.reproducible = true: the noise derives from the run's seed, "
                          "so the coordinator and anyone holding the config can regenerate and "
                          "subtract it; these results are not private against them.")
    return out
