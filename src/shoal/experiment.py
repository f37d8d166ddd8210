"""From a validated :class:`~shoal.config.Config` to finished runs on disk.

``run_experiment`` builds the task, the federation, the algorithm and the transport the config
asks for, runs the chosen paradigm and (with ``baseline = true``) the centralized baseline on
the same task, model initialisation and number of examples seen, and writes one directory::

    RUN_DIR/config.toml                      the resolved config (what actually ran)
    RUN_DIR/summary.json                     one entry per finished paradigm (accuracy, ε,
                                             bytes, time, cost), rewritten as each finishes
    RUN_DIR/<paradigm>/costs.json            bytes and compute time of every participant
    RUN_DIR/<paradigm>/metrics.jsonl         metrics per round
    RUN_DIR/<paradigm>/checkpoints/round-N/  state after the newest rounds
    RUN_DIR/<paradigm>/model.safetensors     the final model

``resume=True`` continues an interrupted run from its newest checkpoints; because every random
draw derives from the seed, the round and the client, the resumed run ends bit-identical to an
uninterrupted one. A resumed run keeps its config, except ``federated.rounds``: more rounds
extend a finished run. A new run refuses a directory that already holds files unless
``overwrite=True`` (see :func:`shoal.checkpoint.prepare_run_dir`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import tree
from .aggregate import (
    Pipeline,
    Reducer,
    ServerOpt,
    Stage,
    adagrad,
    adam,
    clip_by_norm,
    coordinate_median,
    geometric_median,
    krum,
    momentum,
    multi_krum,
    sgd,
    trimmed_mean,
    trusted_mean,
    weighted_mean,
    yogi,
)
from .algorithms.centralized import Centralized
from .algorithms.cohort import Cohort
from .algorithms.fedavg import FedAvg
from .algorithms.fltrust import FLTrust
from .algorithms.influence import WeightCap
from .algorithms.scaffold import Scaffold
from .algorithms.swarm import TRAIN, Swarm
from .attacks.configure import attacked_update
from .audits.planted import plant_canaries
from .audits.views import CaptureViews, observer
from .callbacks import CentralEvaluation, FederatedEvaluation, MetricsLog, read_metrics
from .checkpoint import Checkpoint, check_resume_config, prepare_run_dir, restore_latest
from .client import local_sgd, optimizer_fn
from .config import Config, to_dict, to_toml
from .costs import cost_summary
from .credentials import RunKeys
from .data.arrays import ArrayData
from .data.federated import FederatedDataset, federate
from .data.tasks import Task, load_task
from .errors import ConfigError
from .holdout import HoldoutStopping, carve_validation
from .ledger.keys import registry_key, registry_value
from .ledger.ledger import Ledger
from .ledger.store import MemoryStore
from .loggers import metric_loggers
from .metrics import Evaluator
from .privacy import configure as privacy
from .privacy.distributed import DistributedDP
from .run import run
from .secagg import SecureFedAvg, SecureFederatedEvaluation, secure_aggregation
from .secagg.protocol import MASKED_INPUT
from .seeding import derive_seed
from .sim import InProcessTransport, simulated_dropout
from .sim.executor import make_executor
from .tree import Params
from .validate_config import check_config

__all__ = ["PARADIGMS", "Built", "ParadigmBuilder", "ParadigmResult", "Setup", "build_federated",
           "build_swarm", "centralized_paradigm", "client_optimizer", "config_client_update", "config_reducer", "config_server_opt",
           "federated_paradigm", "initial_params", "make_dataset", "population",
           "primary_metric", "register_paradigm", "resolve_config", "root_data", "run_experiment",
           "scheduled_examples", "swarm_paradigm", "weight_cap"]

log = logging.getLogger(__name__)

CallbackFactory = Callable[[str, int], Sequence[Any]]
"""``fn(paradigm, rounds) -> callbacks`` added to each paradigm's run (e.g. a progress bar)."""


@dataclass
class ParadigmResult:
    """How one paradigm's run ended: final metrics, rounds, examples, bytes (every direction,
    evaluation included) and time, and the full ``cost`` (see :func:`shoal.costs.cost_summary`)."""

    paradigm: str
    rounds: int
    final: dict[str, float]
    examples: float
    bytes: float
    seconds: float
    stopped: str | None = None
    cost: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """The JSON-able summary (no history)."""
        d = dataclasses.asdict(self)
        d.pop("history")
        return d


# -- building ----------------------------------------------------------------------------------

def resolve_config(config: Config, task: Task, *, quiet: bool = False) -> Config:
    """The config with the task's default partition filled into unset ``[data]`` fields, and
    a ``federated.clients_per_round`` count above the number of clients lowered to it (logged
    as a warning unless ``quiet``), so that the config recorded is the one that runs."""
    d = dict(task.default_partition)
    data = config.data
    method = data.partition or d.get("partition", "iid")
    same = method == d.get("partition", "iid")
    resolved = dataclasses.replace(
        data,
        partition=method,
        num_clients=data.num_clients if data.num_clients is not None else d.get("num_clients"),
        alpha=data.alpha if data.alpha is not None else (d.get("alpha") if same else None),
        shards_per_client=(data.shards_per_client if data.shards_per_client is not None
                           else (d.get("shards_per_client") if same else None)),
    )
    config = dataclasses.replace(config, data=resolved)
    f = config.federated
    n = population(config, task)
    if isinstance(f.clients_per_round, int) and n and f.clients_per_round > n:
        if not quiet:
            log.warning("federated.clients_per_round = %d exceeds the %d clients of the "
                        "federation; every round takes all %d, and the run records "
                        "federated.clients_per_round = %d", f.clients_per_round, n, n, n)
        config = dataclasses.replace(config, federated=dataclasses.replace(
            f, clients_per_round=n))
    return config


def population(config: Config, task: Task) -> int:
    """The number of clients the resolved ``config`` federates ``task`` into (0 if unknown):
    ``data.num_clients``, or the task's natural groups."""
    if config.data.partition == "natural":
        return len(set(task.groups.tolist())) if task.groups is not None else 0
    return config.data.num_clients or 0


def primary_metric(config: Config, task: Task) -> str:
    """The metric the run is judged by: ``evaluation.primary``, checked against the task's
    metrics, or the task's own primary metric when it is empty."""
    name = config.evaluation.primary
    if name and name not in task.metric_names():
        raise ConfigError(
            f"config field 'evaluation.primary': {name!r} is not a metric of task "
            f"{task.name!r}; expected one of {', '.join(task.metric_names())} (a {task.kind} "
            "task). A metric of your own goes into your task's Task(metrics={name: fn}), run "
            "with task.name = \"package.module:factory\".")
    return name or task.primary


def make_dataset(config: Config, task: Task) -> FederatedDataset:
    """Partition the task's data as ``[data]`` says (without the coordinator's validation
    rows, ``evaluation.validation_fraction``: see :mod:`shoal.holdout`)."""
    task, _ = carve_validation(config, task)
    d = config.data
    options = {k: v for k, v in (("alpha", d.alpha), ("shards_per_client", d.shards_per_client))
               if v is not None}
    return federate(task, partition=d.partition, num_clients=d.num_clients, seed=config.seed,
                    eval_fraction=d.eval_fraction, **options)


def initial_params(config: Config, task: Task) -> tuple[torch.nn.Module, Params]:
    """A model initialised from the run's seed, and a copy of its params."""
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(config.seed, "init"))
        model = task.model_fn()
    return model, tree.params_of(model)


def client_optimizer(config: Config):  # -> OptimizerFn
    """The ``[client]`` optimizer: a factory from parameters to a ``torch.optim`` optimizer."""
    c = config.client
    kwargs: dict[str, Any] = {"lr": c.lr}
    if c.momentum:
        kwargs["momentum"] = c.momentum
    if c.weight_decay:
        kwargs["weight_decay"] = c.weight_decay
    return optimizer_fn(c.optimizer, **kwargs)


def config_reducer(config: Config) -> Reducer:
    """The ``[federated]`` reducer (``reducer``, ``weighting``, trimming and Krum options)."""
    f = config.federated
    return {
        "mean": lambda: weighted_mean(f.weighting),
        "median": coordinate_median,
        "trimmed_mean": lambda: trimmed_mean(f.trim_beta),
        "krum": lambda: krum(f.krum_f),
        "multi_krum": lambda: multi_krum(f.krum_f, f.krum_m),
        "geometric_median": geometric_median,
        "fltrust": lambda: trusted_mean({}),  # FLTrust sets the round's reference
    }[f.reducer]()


def config_server_opt(config: Config) -> ServerOpt:
    """The ``[federated]`` server optimizer (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)."""
    f = config.federated
    return {
        "fedavg": lambda: sgd(f.server_lr),
        "fedavgm": lambda: momentum(f.server_lr, f.server_momentum),
        "fedadam": lambda: adam(f.server_lr, f.beta1, f.beta2, f.tau),
        "fedyogi": lambda: yogi(f.server_lr, f.beta1, f.beta2, f.tau),
        "fedadagrad": lambda: adagrad(f.server_lr, f.beta1, f.tau),
    }[f.server_opt]()


def weight_cap(config: Config, dataset: FederatedDataset) -> WeightCap:
    """The most weight each client's reply counts with (``federated.max_weight``)."""
    if config.federated.max_weight > 0:
        return WeightCap(fixed=config.federated.max_weight)
    return WeightCap({cid: float(dataset.num_examples(cid)) for cid in dataset.client_ids()})


def config_client_update(config: Config, task: Task, model: torch.nn.Module,
                         noise: float) -> Any:
    """The ``[client]`` update: local SGD (FedProx with ``prox_mu``), or DP-SGD with noise
    multiplier ``noise`` under ``privacy.mode = "sample"``."""
    c = config.client
    update: Any = local_sgd(model, task.loss_fn, epochs=c.epochs, batch_size=c.batch_size,
                            optimizer=client_optimizer(config), prox_mu=c.prox_mu,
                            max_steps=c.max_steps or None)
    return privacy.dp_client_update(config, model, task.loss_fn, client_optimizer(config),
                                    noise) or update


def build_swarm(config: Config, task: Task, dataset: FederatedDataset,
                model: torch.nn.Module) -> tuple[Swarm, InProcessTransport]:
    """The swarm the config describes, simulated: every client is a peer enrolled on an
    in-process ledger with a per-run Ed25519 key (:class:`~shoal.credentials.RunKeys`)."""
    f, sw = config.federated, config.swarm
    peers = list(dataset.client_ids())
    noise = (privacy.noise_for(config, len(dataset), min(map(dataset.num_examples, peers)), 0)
             if config.privacy.mode != "off" else 0.0)
    update = attacked_update(config, task, config_client_update(config, task, model, noise),
                             peers, dataset.client)
    reducer = {"mean": lambda: weighted_mean(f.weighting), "median": coordinate_median,
               "trimmed_mean": lambda: trimmed_mean(sw.trim_beta),
               "geometric_median": geometric_median}[sw.merge]()
    keys = RunKeys()
    store = MemoryStore()
    for p in peers:  # the registrar's enrollment, as `shoal swarm enroll` records it
        store.create(registry_key(p), registry_value(p, keys.public(p)))
    algorithm = Swarm(update, Ledger(store), keys.for_node, reducer=reducer,
                      min_peers=sw.min_peers or len(peers),
                      weight_cap=weight_cap(config, dataset), seed=config.seed, job=sw.job)
    mods = [simulated_dropout(f.dropout, config.seed, (TRAIN,))] if f.dropout > 0 else []
    transport = InProcessTransport(peers, dataset.client, algorithm.handlers(), mods=mods,
                                   on_error=f.on_client_error)
    return algorithm, transport


def build_federated(config: Config, task: Task, dataset: FederatedDataset,
                    model: torch.nn.Module) -> tuple[FedAvg, InProcessTransport]:
    """The FedAvg-family algorithm and the simulated federation the config describes."""
    f = config.federated
    stages: list[Stage] = [clip_by_norm(f.clip_norm, f.clip_at)] if f.clip_norm > 0 else []
    cohort = Cohort(f.clients_per_round, f.sampling)
    dim = tree.numel(tree.params_of(model))
    noise = (privacy.noise_for(config, len(dataset), min(map(dataset.num_examples,
                                                              dataset.client_ids())), dim)
             if config.privacy.mode != "off" else 0.0)
    dp = privacy.dp_stage(config, cohort, noise, len(dataset), dim)
    stages += [dp] if dp is not None else []
    reducer = config_reducer(config)
    pipeline = Pipeline(stages, reducer)
    needs = [(reducer.min_updates, f"{reducer!r} needs that many updates")]
    if isinstance(dp, DistributedDP):
        needs.append((dp.min_clients, "distributed DP needs the noise of that many clients"))
    min_replies = f.min_replies
    for least, why in needs:
        if least > min_replies:
            log.info("min_replies raised from %d to %d: %s", min_replies, least, why)
            min_replies = least
    expected = cohort.expected_size(len(dataset))
    if f.sampling == "fixed" and expected < min_replies:
        raise ConfigError(
            f"config field 'federated.clients_per_round': {f.clients_per_round} gives "
            f"{expected:g} clients per round, but at least {min_replies} valid replies are "
            f"needed (min_replies / {reducer!r}); sample more clients."
        )
    update: Any = attacked_update(config, task, config_client_update(config, task, model, noise),
                                  dataset.client_ids(), dataset.client)
    evaluator = Evaluator.for_task(task, model, batch_size=config.evaluation.batch_size)
    kwargs: dict[str, Any] = dict(
        pipeline=pipeline, server_opt=config_server_opt(config), cohort=cohort,
        min_replies=min_replies, timeout=f.timeout_s or None, client_eval=evaluator,
        seed=config.seed)
    s = config.secagg
    if not s.enabled:
        kwargs["weight_cap"] = weight_cap(config, dataset)
    elif f.max_weight > 0:
        raise ConfigError(
            "config field 'federated.max_weight': secure aggregation caps a client's weight "
            "itself, inside the masked sum; set secagg.max_weight instead (and leave "
            "federated.max_weight = 0).")
    if f.algorithm == "scaffold":
        if s.enabled:
            raise ConfigError(
                "config field 'federated.algorithm': \"scaffold\" sends each client's "
                "control-variate update beside its model update, which secure aggregation "
                "does not cover; set federated.algorithm = \"fedavg\" or secagg.enabled = false.")
        algorithm: FedAvg = Scaffold(update, **kwargs)
    elif f.reducer == "fltrust":
        algorithm = FLTrust(update, root_data(config, task), **kwargs)
    elif s.enabled:
        algorithm = SecureFedAvg(update, secagg=secure_aggregation(
            s.clip, s.max_weight, s.neighbours or None, s.threshold, s.max_mse), **kwargs)
    else:
        algorithm = FedAvg(update, **kwargs)
    kinds = ("train", MASKED_INPUT) if s.enabled else ("train",)
    mods = [simulated_dropout(f.dropout, config.seed, kinds)] if f.dropout > 0 else []
    executor = make_executor(f.executor, workers=f.workers or None, inner=f.worker_executor)
    transport = InProcessTransport(dataset.client_ids(), dataset.client, algorithm.handlers(),
                                   mods=mods, on_error=f.on_client_error, executor=executor)
    return algorithm, transport


def root_data(config: Config, task: Task) -> ArrayData:
    """FLTrust's root data set: ``federated.root_examples`` examples of the task's training
    pool, drawn from the seed (the paper's coordinator collects them itself)."""
    n = min(config.federated.root_examples, len(task.train))
    g = torch.Generator().manual_seed(derive_seed(config.seed, "fltrust-root-data"))
    return task.train.subset(torch.randperm(len(task.train), generator=g)[:n])


def scheduled_examples(config: Config, dataset: FederatedDataset) -> list[int]:
    """Examples the federated run is scheduled to train on in each round (no dropouts)."""
    cohort = Cohort(config.federated.clients_per_round, config.federated.sampling)
    ids = dataset.client_ids()
    c = config.client
    out = []
    for r in range(1, config.federated.rounds + 1):
        total = 0
        for cid in cohort.sample(ids, config.seed, r):
            n = dataset.num_examples(cid) * c.epochs
            if c.max_steps:
                n = min(n, c.max_steps * c.batch_size)
            total += n
        out.append(max(total, 1))
    return out


# -- paradigms ------------------------------------------------------------------------------

@dataclass
class Setup:
    """What every paradigm of a run shares: the config, the task, the federation, the model
    and its initial params, the evaluator, and the histories of paradigms already run."""

    config: Config
    task: Task
    dataset: FederatedDataset
    model: torch.nn.Module
    params0: Params
    evaluator: Evaluator
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Built:
    """A paradigm ready to run: its algorithm, transport, and callbacks of its own."""

    algorithm: Any
    transport: Any
    callbacks: list[Any] = field(default_factory=list)


ParadigmBuilder = Callable[[Setup], Built]
PARADIGMS: dict[str, ParadigmBuilder] = {}
"""Paradigm name (``config.paradigm``) -> builder."""


def register_paradigm(name: str) -> Callable[[ParadigmBuilder], ParadigmBuilder]:
    """Register ``builder(setup) -> Built`` as paradigm ``name``."""
    def decorate(builder: ParadigmBuilder) -> ParadigmBuilder:
        PARADIGMS[name] = builder
        return builder
    return decorate


@register_paradigm("federated")
def federated_paradigm(setup: Setup) -> Built:
    """FedAvg and its family over the simulated federation, with federated evaluation."""
    config = setup.config
    algorithm, transport = build_federated(config, setup.task, setup.dataset, setup.model)
    callbacks: list[Any] = [cb for cb in [privacy.dp_callback(
        config, algorithm, len(setup.dataset), setup.dataset.num_examples)] if cb is not None]
    if config.data.eval_fraction > 0:
        every = config.evaluation.federated_every or config.federated.rounds
        task = setup.task
        callbacks.append(SecureFederatedEvaluation(every) if config.secagg.enabled
                         else FederatedEvaluation(every, metric=task.primary,
                                                  lower_is_better=task.lower_is_better()))
    return Built(algorithm, transport, callbacks)


@register_paradigm("swarm")
def swarm_paradigm(setup: Setup) -> Built:
    """Swarm learning over simulated peers and an in-process ledger (no aggregator); DP-SGD's
    accounting per peer under ``privacy.mode = "sample"``."""
    config = setup.config
    algorithm, transport = build_swarm(config, setup.task, setup.dataset, setup.model)
    callbacks: list[Any] = [cb for cb in [privacy.dp_callback(
        config, algorithm, len(setup.dataset), setup.dataset.num_examples)] if cb is not None]
    return Built(algorithm, transport, callbacks)


@register_paradigm("centralized")
def centralized_paradigm(setup: Setup) -> Built:
    """The pooled-data baseline, round by round on as many examples as the paradigm it is
    compared with saw (or as the federated schedule would see, when run alone). Its first round
    uploads every client's training data to the server, over the simulated transport, so the
    upload is counted (and seen by observers) like any other traffic."""
    config = setup.config
    primary = setup.histories.get(config.paradigm)
    counted = primary and all("train/examples" in h for h in primary)  # not with distributed DP
    examples = ([int(h["train/examples"]) or 1 for h in primary] if primary and counted
                else scheduled_examples(config, setup.dataset))
    algorithm = Centralized(setup.model, setup.task.loss_fn, examples_per_round=examples,
                            batch_size=config.client.batch_size,
                            optimizer=client_optimizer(config), seed=config.seed)
    return Built(algorithm, InProcessTransport(setup.dataset.client_ids(), setup.dataset.client,
                                               algorithm.handlers()))


# -- running -----------------------------------------------------------------------------------

def run_experiment(config: Config, run_dir: str | Path, *, resume: bool = False,
                   overwrite: bool = False, callbacks: CallbackFactory | None = None,
                   transport: Callable[[str, Built], Any] | None = None,
                   round_retries: int = 0) -> list[ParadigmResult]:
    """Run what ``config`` asks for into ``run_dir``; see the module docstring.

    ``transport(paradigm, built)``, when given, supplies the transport each paradigm runs over
    instead of its simulated one (``shoal serve`` passes the gRPC coordinator, and closes it
    itself: BYE when the run is over, RESTART when it stopped before);
    ``round_retries`` is :func:`shoal.run.run`'s (``shoal serve``: ``network.round_retries``).
    ``overwrite=True`` empties an existing run directory first (a new run refuses one that
    holds files)."""
    if config.seeds:
        raise ConfigError(f"config field 'seeds': {config.seeds} asks for one run per seed, "
                          "which shoal.seeds.run_seeds (or `shoal run`) does; run_experiment "
                          "runs one seed (config field 'seed'): set seeds = [] for it.")
    check_config(config)  # every problem of the config, before anything is written
    run_dir = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    task = load_task(config.task.name, **config.task.options)
    task.primary = primary_metric(config, task)
    config = resolve_config(config, task)
    if resume:  # only federated.rounds may change; the run's config.toml then says so
        check_resume_config(run_dir, config)
    (run_dir / "config.toml").write_text(to_toml(config))
    if task.test is None or len(task.test) == 0:
        raise ConfigError(f"task {task.name!r} has no test set for central evaluation.")
    model, params0 = initial_params(config, task)
    dataset = plant_canaries(config, task, make_dataset(config, task), run_dir, resume=resume)
    setup = Setup(config, task, dataset, model, params0,
                  Evaluator.for_task(task, model, batch_size=config.evaluation.batch_size))

    def central(params: Params) -> dict[str, float]:
        return setup.evaluator(params, task.test)

    _, validation = carve_validation(config, task)  # the rows make_dataset kept from clients

    def holdout() -> list[Any]:  # a fresh one per paradigm: it keeps the best value so far
        if validation is None:
            return []
        e = config.evaluation
        return [HoldoutStopping(lambda p: setup.evaluator(p, validation), metric=task.primary,
                                lower_is_better=task.lower_is_better(), patience=e.patience,
                                min_delta=e.min_delta)]

    rounds = config.federated.rounds
    paradigms = [config.paradigm]
    if config.baseline and config.paradigm != "centralized":
        paradigms.append("centralized")
    results: list[ParadigmResult] = []
    for paradigm in paradigms:
        out = run_dir / paradigm
        built = PARADIGMS[paradigm](setup)
        own = built.transport  # closed below; a transport the caller supplies is the caller's
        if transport is not None:
            built.transport = transport(paradigm, built)
        cbs: list[Any] = [
            CentralEvaluation(central, every=config.evaluation.central_every or rounds),
            *built.callbacks,
            *holdout(),
            MetricsLog(out / "metrics.jsonl"),
            Checkpoint(out / "checkpoints", config.checkpoint.every, config.checkpoint.keep,
                       config=config),
            *metric_loggers(config, run_dir, paradigm),  # [logging]: TensorBoard, MLflow
            *([CaptureViews(config.audit.capture_rounds, out / "views",
                            observer(paradigm, setup.dataset))]
              if config.audit.capture_rounds and paradigm in ("federated", "swarm") else []),
            *(callbacks(paradigm, rounds) if callbacks else []),
        ]
        try:
            result = _run_one(paradigm, built.algorithm, built.transport, params0, rounds, cbs,
                              out, resume, config, round_retries,
                              _finished(run_dir, paradigm) if resume else None)
        finally:
            if hasattr(own, "close"):  # stops an executor's worker processes
                own.close()
        results.append(result)
        setup.histories[paradigm] = result.history
        # After each paradigm: a resumed run takes a finished paradigm's entry from here.
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(
            {"config": to_dict(config), "results": [r.summary() for r in results]}, indent=2))
        tmp.replace(run_dir / "summary.json")
    if config.audit.run:  # [audit]: what `shoal audit RUN_DIR` does, now
        from .audits.run_audit import audit_run
        audit_run(run_dir, config.audit.run, trust_code=True)  # this run's own task
    return results


def _finished(run_dir: Path, paradigm: str) -> dict[str, Any] | None:
    """``paradigm``'s entry in the run's ``summary.json`` (it finished), or ``None``."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        entries = json.loads(path.read_text()).get("results", [])
    except (json.JSONDecodeError, AttributeError):
        log.warning("%s is not readable JSON; the paradigms are resumed from their checkpoints",
                    path)
        return None
    return next((e for e in entries if isinstance(e, dict) and e.get("paradigm") == paradigm),
                None)


def _run_one(paradigm: str, algorithm: Any, transport: Any, params0: Params, rounds: int,
             callbacks: list[Any], out: Path, resume: bool, config: Config,
             round_retries: int = 0, finished: dict[str, Any] | None = None) -> ParadigmResult:
    """Run (or resume) one paradigm; ``finished``: its summary entry when a resumed run had
    finished it (returned as it is, unless more rounds extend it)."""
    if finished is not None and (finished["rounds"] >= rounds or finished.get("stopped")):
        return ParadigmResult(**finished, history=read_metrics(out / "metrics.jsonl"))
    start_round, state, history = 1, None, None
    if resume and (found := restore_latest(out / "checkpoints", algorithm, params0, transport,
                                           config)) is not None:
        start_round, state, history, ckpt = found
        log.info("%s: resuming after round %d from %s", paradigm, start_round - 1, ckpt)
    t0 = time.perf_counter()
    res = run(algorithm, transport, rounds=rounds, callbacks=callbacks,
              params=params0 if state is None else None, state=state,
              start_round=start_round, history=history, round_retries=round_retries)
    seconds = time.perf_counter() - t0 + sum(
        h.get("time/round_s", 0.0) for h in (history or []))
    final_params = algorithm.params(res.state)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in final_params.items()},
              str(out / "model.safetensors"))
    last = res.history[-1] if res.history else {}
    final = {k.removeprefix("central/"): v for k, v in last.items()
             if k.startswith("central/") and isinstance(v, float) and not math.isnan(v)}
    for k, v in last.items():
        if k.startswith("fed_eval/"):
            final[k] = v
    cost, participants = cost_summary(res.history, transport.stats)
    (out / "costs.json").write_text(json.dumps({"participants": participants}, indent=1))
    result = ParadigmResult(
        paradigm=paradigm, rounds=res.rounds, final=final,
        examples=math.fsum(h.get("train/examples", 0.0) for h in res.history),
        bytes=cost["bytes"]["total"], seconds=seconds, stopped=res.stopped, cost=cost,
        privacy=(privacy.privacy_summary(config, res.history)
                 if paradigm in ("federated", "swarm") else {}),
        history=res.history)
    return result
