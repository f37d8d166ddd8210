"""Whole-config validation: every problem of a config, found before anything runs.

:mod:`shoal.config` checks each field on its own (type, range, spelling). This module checks
what only the whole config decides: settings a paradigm does not implement (they would be
recorded in ``config.toml`` as if applied), combinations that cannot run together (secure
aggregation with a robust reducer, DP-FedAvg without its requirements), the task and its
options, and — with the task loaded — what depends on the federation's size: enough clients
per round for the reducer, distributed DP's contributors, and a privacy budget that the first
round alone would exceed.

``shoal config`` prints every problem at once and exits non-zero; ``shoal run`` and
:func:`shoal.experiment.run_experiment` call :func:`check_config` before they create a run
directory. Each message names the config field to change and the values that would work.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .config import Config, load_config, problems_error
from .errors import ShoalError

__all__ = ["check_config", "config_problems", "load_checked"]

log = logging.getLogger(__name__)

_SECAGG_REDUCERS = ("mean",)


def config_problems(config: Config) -> list[str]:
    """Every problem of ``config`` that would fail or silently change a run (an empty list
    when it is ready to run); loads the task (not the other paradigms' data) to check what
    depends on the federation."""
    out = _paradigm_problems(config) + _attack_problems(config)
    if config.audit.capture_rounds and config.paradigm not in ("federated", "swarm"):
        out.append(
            f"config field 'audit.capture_rounds': paradigm = \"{config.paradigm}\" has no "
            "coordinator or peer receiving updates whose view could be captured, so it would "
            "not be applied; set audit.capture_rounds = [], or paradigm = \"federated\" or "
            "\"swarm\".")
    if config.audit.canaries:
        from .audits.planted import canary_problems
        out.extend(canary_problems(config))
    late = [r for r in config.audit.capture_rounds if r > config.federated.rounds]
    if late:
        out.append(
            f"config field 'audit.capture_rounds': rounds {late} come after the last round "
            f"({config.federated.rounds}); capture rounds 1 to {config.federated.rounds}.")
    f, s = config.federated, config.secagg
    if f.sampling == "poisson" and isinstance(f.clients_per_round, int):
        out.append(
            f"config field 'federated.clients_per_round': federated.sampling = \"poisson\" "
            f"includes each client with a probability, so it needs a fraction in (0, 1], got "
            f"the count {f.clients_per_round}; set e.g. federated.clients_per_round = 0.5.")
    if config.paradigm == "federated" and s.enabled:
        if f.reducer not in _SECAGG_REDUCERS:
            out.append(
                f"config field 'federated.reducer': secure aggregation (secagg.enabled = true) "
                f"reveals only the sum of the updates, which federated.reducer = "
                f"\"{f.reducer}\" cannot reduce (it needs each update); set federated.reducer = "
                "\"mean\", or secagg.enabled = false to keep the robust reducer.")
        if f.clip_norm > 0 and f.clip_at == "coordinator":
            out.append(
                "config field 'federated.clip_at': \"coordinator\" clips each update at the "
                "coordinator, which under secure aggregation (secagg.enabled = true) sees only "
                "their sum; set federated.clip_at = \"client\".")
        if f.max_weight > 0:
            out.append(
                "config field 'federated.max_weight': secure aggregation caps a client's "
                "weight itself, inside the masked sum; set secagg.max_weight instead (and "
                "leave federated.max_weight = 0).")
        if f.algorithm == "scaffold":
            out.append(
                "config field 'federated.algorithm': \"scaffold\" sends each client's "
                "control-variate update beside its model update, which secure aggregation "
                "does not cover; set federated.algorithm = \"fedavg\" or secagg.enabled = "
                "false.")
    out += _optimizer_problems(config)
    task_problem, population = _population(config)
    if task_problem is not None:
        out.append(task_problem)
    elif config.evaluation.primary:
        out += _primary_problems(config)
    if config.paradigm == "swarm" and task_problem is None:
        out += _swarm_size_problems(config, population)
    if config.paradigm == "federated":
        from .privacy.configure import privacy_problems

        out += privacy_problems(config, population or None)
        if task_problem is None:
            out += _cohort_problems(config, population)
        if not out:
            out += _budget_problems(config)
    return out


def check_config(config: Config) -> None:
    """Raise one :class:`~shoal.errors.ConfigError` listing every problem
    :func:`config_problems` finds; return if there is none."""
    problems = config_problems(config)
    if problems:
        raise problems_error(problems)


def load_checked(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """:func:`shoal.config.load_config`, then :func:`config_problems`; one ConfigError lists
    the problems of both (every bad field and every bad combination)."""
    problems: list[str] = []
    config = load_config(path, overrides, problems)
    problems += [p for p in config_problems(config) if p not in problems]
    if problems:
        raise problems_error(problems)
    return config


def _paradigm_problems(config: Config) -> list[str]:
    """Settings the paradigm does not implement: an error, not a setting recorded as if it
    had been applied."""
    paradigm = config.paradigm
    if paradigm == "federated":
        return []
    if paradigm == "swarm":
        return _swarm_problems(config)
    out = []
    where = f"paradigm = \"{paradigm}\""
    if config.privacy.mode != "off":
        out.append(
            f"config field 'privacy.mode': {where} does not implement differential privacy, "
            f"so privacy.mode = \"{config.privacy.mode}\" would not be applied; set "
            "privacy.mode = \"off\", or paradigm = \"federated\" (with baseline = true the "
            "centralized baseline runs beside it, without DP).")
    if config.secagg.enabled:
        out.append(
            f"config field 'secagg.enabled': {where} does not implement secure aggregation, so "
            "secagg.enabled = true would not be applied; set secagg.enabled = false, or "
            "paradigm = \"federated\".")
    splitfed = paradigm == "split" and config.split.schedule == "splitfed"
    if config.federated.max_weight > 0 and not splitfed:
        out.append(
            f"config field 'federated.max_weight': {where}"
            + (" with split.schedule = \"vanilla\"" if paradigm == "split" else "")
            + " does not weigh reported example counts, so federated.max_weight = "
            f"{config.federated.max_weight:g} would not be applied; set federated.max_weight = 0, "
            "or paradigm = \"federated\""
            + (" or split.schedule = \"splitfed\"" if paradigm == "split" else "") + ".")
    if config.federated.algorithm != "fedavg":
        out.append(
            f"config field 'federated.algorithm': {where} does not run "
            f"\"{config.federated.algorithm}\"; set federated.algorithm = \"fedavg\", or "
            "paradigm = \"federated\".")
    return out


def _attack_problems(config: Config) -> list[str]:
    """``[attack]`` is applied to federated and swarm runs, by the clients of one process."""
    a = config.attack
    if a.kind == "none":
        return []
    out = []
    if config.paradigm == "split":
        from .attacks.configure import DATA_POISONING

        if a.kind not in DATA_POISONING:
            out.append(
                f"config field 'attack.kind': in split learning a client sends activations, "
                f"not model updates, so attack.kind = \"{a.kind}\" would not be applied; "
                f"choose one that poisons the client's data ({', '.join(DATA_POISONING)}).")
        elif config.split.labels == "server":
            out.append(
                "config field 'attack.kind': with split.labels = \"server\" the server holds "
                "the labels, so a client cannot poison them; set split.labels = \"client\".")
    elif config.paradigm not in ("federated", "swarm"):
        out.append(
            f"config field 'attack.kind': paradigm = \"{config.paradigm}\" has no malicious "
            f"participants yet, so attack.kind = \"{a.kind}\" would not be applied; set "
            "attack.kind = \"none\", or paradigm = \"federated\", \"swarm\" or \"split\".")
    if config.federated.algorithm == "scaffold":
        out.append(
            "config field 'attack.kind': federated.algorithm = \"scaffold\" needs client "
            "updates with gradient corrections, which the attack wrappers do not have yet; "
            "set federated.algorithm = \"fedavg\" or attack.kind = \"none\".")
    if a.kind in ("alie", "ipm") and config.federated.executor in ("processes", "auto"):
        out.append(
            f"config field 'federated.executor': attack.kind = \"{a.kind}\" has its attackers "
            "collude in one process, which executor = "
            f"\"{config.federated.executor}\" may split into workers; set federated.executor = "
            "\"sequential\" or \"vectorized\".")
    return out


def _swarm_problems(config: Config) -> list[str]:
    """What swarm learning does not implement: it has no aggregator (no central or distributed
    DP, no secure aggregation, no server optimizer, no coordinator-side clipping), every peer
    takes part in every round, and it merges with ``swarm.merge``."""
    f, out = config.federated, []
    where = "paradigm = \"swarm\""
    if config.privacy.mode in ("user", "distributed"):
        out.append(
            f"config field 'privacy.mode': {where} has no aggregator to add \"{config.privacy.mode}"
            "\" noise to the merged model; set privacy.mode = \"sample\" (DP-SGD on every "
            "peer) or \"off\", or paradigm = \"federated\".")
    if config.secagg.enabled:
        out.append(
            f"config field 'secagg.enabled': {where} merges each peer's update by its hash "
            "on the ledger; secure aggregation needs a coordinator. Set secagg.enabled = false, "
            "or paradigm = \"federated\".")
    defaults = {"algorithm": "fedavg", "reducer": "mean", "server_opt": "fedavg",
                "clip_norm": 0.0, "sampling": "fixed", "executor": "sequential"}
    use = {"reducer": "set swarm.merge instead"}
    for name, default in defaults.items():
        value = getattr(f, name)
        if value != default:
            out.append(
                f"config field 'federated.{name}': {where} does not implement it, so "
                f"federated.{name} = {value!r} would not be applied; "
                f"{use.get(name, f'leave it at {default!r}')}.")
    return out


def _swarm_size_problems(config: Config, population: int) -> list[str]:
    """Every peer takes part in every round; ``swarm.min_peers`` cannot exceed the peers."""
    out = []
    c, sw = config.federated.clients_per_round, config.swarm
    if (c < population) if isinstance(c, int) else (c < 1):
        out.append(
            f"config field 'federated.clients_per_round': paradigm = \"swarm\" has every one "
            f"of the {population} peers take part in every round, so clients_per_round = {c} "
            f"would not be applied; set it to {population} (or more), and swarm.min_peers for "
            "the fewest updates a round merges.")
    if sw.min_peers > population:
        out.append(
            f"config field 'swarm.min_peers': {sw.min_peers} is more than the {population} "
            f"peers of this task; set swarm.min_peers <= {population} (0: every peer).")
    if sw.merge == "trimmed_mean" and not 0 <= sw.trim_beta < 0.5:
        out.append(f"config field 'swarm.trim_beta': must be in [0, 0.5) (got {sw.trim_beta}).")
    return out


def _optimizer_problems(config: Config) -> list[str]:
    from .experiment import client_optimizer

    try:
        client_optimizer(config)
    except ShoalError as e:
        return [f"config field 'client.optimizer': {e}"]
    return []


def _population(config: Config) -> tuple[str | None, int]:
    """``(why the task cannot be loaded or None, the number of clients)``."""
    from .data.tasks import load_task, task_options
    from .experiment import population, resolve_config

    try:
        accepted = task_options(config.task.name)
    except ShoalError as e:
        return f"config field 'task.name': {e}", 0
    unknown = sorted(set(config.task.options) - set(accepted))
    if unknown:
        names = ", ".join(f"'task.{k}'" for k in unknown)
        return (f"config field{'s' if len(unknown) > 1 else ''} {names}: task "
                f"{config.task.name!r} has no option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; its options are "
                f"{', '.join(f'task.{k}' for k in accepted) or 'none'}."), 0
    try:
        task = load_task(config.task.name, **config.task.options)
    except ShoalError as e:
        return f"config [task]: {e}", 0
    return None, population(resolve_config(config, task, quiet=True), task)


def _primary_problems(config: Config) -> list[str]:
    """``evaluation.primary`` must name one of the task's metrics."""
    from .data.tasks import load_task
    from .experiment import primary_metric

    try:
        primary_metric(config, load_task(config.task.name, **config.task.options))
    except ShoalError as e:
        return [str(e)]
    return []


def _cohort_problems(config: Config, population: int) -> list[str]:
    from .experiment import config_reducer

    f = config.federated
    least = max(f.min_replies, config_reducer(config).min_updates)
    if f.sampling != "fixed":
        return []
    c = f.clients_per_round
    expected = min(c, population) if isinstance(c, int) else max(1, int(c * population + 1e-9))
    if expected >= least:
        return []
    why = (f"federated.reducer = \"{f.reducer}\" needs {least} updates"
           if least > f.min_replies else f"federated.min_replies = {f.min_replies}")
    return [f"config field 'federated.clients_per_round': {c} gives {expected} of the "
            f"{population} clients per round, but {why}; sample at least {least} clients per "
            "round, or lower the requirement."]


def _budget_problems(config: Config) -> list[str]:
    p = config.privacy
    if p.mode == "off" or p.target_epsilon <= 0 or p.noise_multiplier <= 0:
        return []
    from . import tree
    from .data.tasks import load_task
    from .experiment import make_dataset, resolve_config
    from .privacy.configure import budget_problem

    task = load_task(config.task.name, **config.task.options)
    resolved = resolve_config(config, task, quiet=True)
    dataset = make_dataset(resolved, task)
    dim = tree.numel(tree.params_of(task.model_fn())) if p.mode == "distributed" else 0
    problem = budget_problem(resolved, dataset.client_ids(), dataset.num_examples, dim)
    return [problem] if problem is not None else []
