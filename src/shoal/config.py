"""The run configuration: a TOML file, validated field by field.

Every field has a type and a range; an unknown field, a wrong type or a value out of range is a
:class:`~shoal.errors.ConfigError` that names the field, what was expected and what was got,
and suggests the closest known field for a typo. ``--set section.field=value`` overrides any
field from the command line.

    seed = 0
    paradigm = "federated"        # federated | centralized | data_parallel | split
    baseline = true               # also train the centralized baseline and report the gap

    [task]                        # name plus the task's own options (data_dir, model, ...)
    name = "digits"

    [data]                        # how the task's data is split across clients
    partition = "dirichlet"
    num_clients = 20
    alpha = 0.5

    [federated]
    rounds = 30
    clients_per_round = 10        # a count, or a fraction of the clients (0.1)

    [client]
    epochs = 5
    batch_size = 16
    lr = 0.1

The defaults are the built-in demo: digits, 20 clients with Dirichlet(0.5) label skew, 10 per
round, 30 rounds, 5 local epochs of SGD.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from .errors import ConfigError

__all__ = ["AttackConfig", "AuditConfig", "CheckpointConfig", "ClientConfig", "Config", "DataConfig", "DataParallelConfig",
           "EvaluationConfig", "FederatedConfig", "LoggingConfig", "NetworkConfig",
           "PrivacyConfig", "SecAggConfig",
           "SplitConfig", "SwarmConfig", "TaskConfig", "apply_overrides", "load_config", "parse_config",
           "problems_error", "to_dict", "to_toml"]


def _check(**constraints: Any) -> dict[str, Any]:
    return {"check": constraints}


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Names that travel in keys, certificates and paths (node ids, a swarm's job): letters,
digits, ``.``, ``_`` and ``-``, at most 64 characters, starting with a letter or digit."""


@dataclass
class TaskConfig:
    """Which built-in task (model, loss, data); other keys are the task's own options."""

    name: str = "digits"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """How the task's training data is split into clients (unset fields: the task's default)."""

    partition: Literal["iid", "dirichlet", "shards", "quantity", "natural"] | None = None
    num_clients: int | None = field(default=None, metadata=_check(min=1))
    alpha: float | None = field(default=None, metadata=_check(gt=0))
    shards_per_client: int | None = field(default=None, metadata=_check(min=1))
    eval_fraction: float = field(default=0.2, metadata=_check(min=0, lt=1))


@dataclass
class FederatedConfig:
    """Rounds, cohorts, dropouts, aggregation and the server optimizer. ``reducer =
    "fltrust"`` runs FLTrust (:class:`~shoal.algorithms.fltrust.FLTrust`): the coordinator
    trains on ``root_examples`` clean examples of its own each round and trusts an update by
    its agreement with that (in simulation they are drawn from the task's training pool)."""

    algorithm: Literal["fedavg", "scaffold"] = "fedavg"
    rounds: int = field(default=30, metadata=_check(min=1))
    clients_per_round: int | float = field(default=10, metadata=_check(gt=0))
    sampling: Literal["fixed", "poisson"] = "fixed"
    min_replies: int = field(default=1, metadata=_check(min=1))
    dropout: float = field(default=0.0, metadata=_check(min=0, lt=1))
    timeout_s: float = field(default=0.0, metadata=_check(min=0))
    on_client_error: Literal["drop", "raise"] = "drop"
    weighting: Literal["examples", "uniform"] = "examples"
    reducer: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum",
                     "geometric_median", "fltrust"] = "mean"
    trim_beta: float = field(default=0.1, metadata=_check(min=0, lt=0.5))
    krum_f: int = field(default=1, metadata=_check(min=0))
    krum_m: int = field(default=1, metadata=_check(min=1))
    root_examples: int = field(default=100, metadata=_check(min=1))
    clip_norm: float = field(default=0.0, metadata=_check(min=0))
    clip_at: Literal["client", "coordinator"] = "client"
    server_opt: Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = "fedavg"
    server_lr: float = field(default=1.0, metadata=_check(gt=0))
    server_momentum: float = field(default=0.9, metadata=_check(min=0, lt=1))
    beta1: float = field(default=0.9, metadata=_check(min=0, lt=1))
    beta2: float = field(default=0.99, metadata=_check(min=0, lt=1))
    tau: float = field(default=1e-3, metadata=_check(gt=0))
    # The most weight a client's reply counts with: 0 = the examples the partition assigned to
    # it (a client outside the partition: the median assignment); > 0 = this for every client.
    max_weight: float = field(default=0.0, metadata=_check(min=0))
    # How the simulated clients are computed (shoal.sim.executor); workers 0: one per core.
    executor: Literal["sequential", "vectorized", "processes", "auto"] = "sequential"
    workers: int = field(default=0, metadata=_check(min=0))
    worker_executor: Literal["sequential", "vectorized"] = "sequential"

    def __post_init__(self) -> None:
        c = self.clients_per_round
        if isinstance(c, float) and c > 1:
            raise ConfigError(
                f"config field 'federated.clients_per_round': expected a count (an integer "
                f">= 1) or a fraction in (0, 1], got {c}."
            )


@dataclass
class ClientConfig:
    """Local training: epochs, batch size, the torch optimizer and FedProx's mu."""

    epochs: int = field(default=5, metadata=_check(min=1))
    batch_size: int = field(default=16, metadata=_check(min=1))
    optimizer: str = "SGD"
    lr: float = field(default=0.1, metadata=_check(gt=0))
    momentum: float = field(default=0.0, metadata=_check(min=0, lt=1))
    weight_decay: float = field(default=0.0, metadata=_check(min=0))
    prox_mu: float = field(default=0.0, metadata=_check(min=0))
    max_steps: int = field(default=0, metadata=_check(min=0))


@dataclass
class EvaluationConfig:
    """How often to evaluate: centrally (coordinator's test set) and federated (clients'
    held-out data); 0 means only after the last round."""

    central_every: int = field(default=1, metadata=_check(min=0))
    federated_every: int = field(default=0, metadata=_check(min=0))
    batch_size: int = field(default=2048, metadata=_check(min=1))
    # The metric the run is judged by (worst client, percentile, summary), one of the task's
    # (loss, accuracy, f1, auc, rmse, mae, perplexity or its own); "": the task's primary.
    primary: str = ""
    # A validation set for the coordinator, never the test set (shoal.holdout): this fraction
    # of the training pool is set aside before the data is dealt out to clients and evaluated
    # after every round (val/<metric>); patience > 0 stops training once the primary metric on
    # it has not improved by more than min_delta for that many rounds (0: no early stopping).
    validation_fraction: float = field(default=0.0, metadata=_check(min=0, lt=1))
    patience: int = field(default=0, metadata=_check(min=0))
    min_delta: float = field(default=0.0, metadata=_check(min=0))

    def __post_init__(self) -> None:
        if self.patience > 0 and self.validation_fraction == 0:
            raise ConfigError(
                f"config field 'evaluation.patience': early stopping ({self.patience} rounds) "
                "needs a validation set, but evaluation.validation_fraction = 0; set it (e.g. "
                "0.1), so that the test set stays out of training decisions.")


@dataclass
class CheckpointConfig:
    """How often to checkpoint and how many checkpoints to keep."""

    every: int = field(default=1, metadata=_check(min=1))
    keep: int = field(default=2, metadata=_check(min=1))


@dataclass
class SecAggConfig:
    """Secure aggregation (SecAgg+, ``shoal.secagg``): the coordinator sees only sums.

    ``clip`` bounds each update coordinate, ``max_weight`` a client's weight (examples);
    ``neighbours`` is the degree of the neighbour graph (0: 3*ceil(log2 n)); ``threshold`` the
    fraction of a client's neighbours needed to unmask it, above one half (a split of the
    neighbours could otherwise yield both of a client's secrets); ``max_mse`` bounds a
    client's mean squared error in secure federated evaluation of a regression task."""

    enabled: bool = False
    clip: float = field(default=10.0, metadata=_check(gt=0))
    max_weight: float = field(default=1000.0, metadata=_check(gt=0))
    neighbours: int = field(default=0, metadata=_check(min=0))
    threshold: float = field(default=0.51, metadata=_check(gt=0))
    max_mse: float = field(default=1e4, metadata=_check(gt=0))

    def __post_init__(self) -> None:
        if not 0.5 < self.threshold <= 1:
            raise ConfigError(
                f"config field 'secagg.threshold': expected a fraction of the neighbours in "
                f"(0.5, 1], got {self.threshold}: at or below one half a coordinator that tells "
                "some neighbours a client survived and the others that it dropped could unmask "
                "its input."
            )


@dataclass
class PrivacyConfig:
    """Differential privacy (see docs/privacy.md).

    ``mode``: ``"off"``, ``"sample"`` (DP-SGD on every client; ``clip_norm`` per example),
    ``"user"`` (DP-FedAvg, central noise; ``clip_norm`` per client update, needs
    ``federated.weighting = "uniform"``) or ``"distributed"`` (the distributed discrete
    Gaussian: each client adds its share of the noise inside secure aggregation, which it
    needs; every released sum holds the noise of at least ``min_clients`` clients — 0: 90 % of
    the expected cohort after dropouts — and rounds with fewer contributors fail).
    ``accountant``: ``"auto"`` is RDP for distributed DP, PLD otherwise. ``noise_multiplier = 0`` calibrates it so the planned rounds spend
    ``target_epsilon``; ``target_epsilon > 0`` is also a budget that stops training before the
    round that would exceed it. ``count_stddev = 0``: expected cohort size / 20.
    ``reproducible``: draw the DP noise and DP-SGD's batch sampling from the run's seed, so a
    rerun is bit-identical; then anyone holding the config (the coordinator, every client) can
    regenerate the noise and subtract it, so results say "not private against the
    coordinator". Off by default (a secret keystream keyed by the OS); ``shoal serve`` and
    ``shoal join`` refuse it.
    """

    mode: Literal["off", "sample", "user", "distributed"] = "off"
    accountant: Literal["auto", "pld", "rdp"] = "auto"
    delta: float = field(default=1e-5, metadata=_check(gt=0, lt=1))
    target_epsilon: float = field(default=0.0, metadata=_check(min=0))
    noise_multiplier: float = field(default=0.0, metadata=_check(min=0))
    clip_norm: float = field(default=1.0, metadata=_check(gt=0))
    adaptive_clipping: bool = False
    target_quantile: float = field(default=0.5, metadata=_check(gt=0, lt=1))
    clip_lr: float = field(default=0.2, metadata=_check(gt=0))
    count_stddev: float = field(default=0.0, metadata=_check(min=0))
    grad_sample_mode: Literal["bookkeeping", "ghost", "hooks"] = "bookkeeping"
    reproducible: bool = False
    min_clients: int = field(default=0, metadata=_check(min=0))


@dataclass
class NetworkConfig:
    """Deployment (``shoal serve`` / ``shoal join``): where the coordinator listens, the TLS
    files, message limits, how long to wait for clients and how clients reconnect."""

    address: str = "127.0.0.1:50051"
    tls_dir: str = "certs"
    server_name: str = ""
    insecure: bool = False
    min_nodes: int = field(default=1, metadata=_check(min=1))
    wait_s: float = field(default=300.0, metadata=_check(min=0))
    max_message_mb: float = field(default=512.0, metadata=_check(gt=0))
    chunk_kb: int = field(default=1024, metadata=_check(min=1, lt=4096))
    reconnect_max_s: float = field(default=30.0, metadata=_check(gt=0))
    # How long a client keeps reconnecting without a connection (the coordinator down or
    # restarting, or refusing the connection) before it exits with an error; 0: never gives up.
    patience_s: float = field(default=600.0, metadata=_check(min=0))
    # Once a round has min_replies valid replies, stragglers get late_grace_s more seconds
    # (0: wait for every reply up to federated.timeout_s).
    late_grace_s: float = field(default=30.0, metadata=_check(min=0))
    # A file holding the passphrase of this party's private key in tls_dir, when the key is
    # encrypted (`shoal ca enroll --key-passphrase-file`); "" for an unencrypted key.
    key_passphrase_file: str = ""
    # How often the coordinator reruns a round that got too few valid replies before it
    # records it as failed (forced to 0 under differential privacy, and logged: the accountant
    # counts rounds, and every attempt releases updates).
    round_retries: int = field(default=3, metadata=_check(min=0))


@dataclass
class DataParallelConfig:
    """``paradigm = "data_parallel"``: ``workers`` processes train one model on shards of the
    pooled data with torch.distributed; ``local_steps`` > 0 averages the models every that many
    steps (local SGD) instead of all-reducing gradients every step."""

    workers: int = field(default=2, metadata=_check(min=1))
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    local_steps: int = field(default=0, metadata=_check(min=0))
    steps_per_round: int = field(default=0, metadata=_check(min=0))


@dataclass
class SplitConfig:
    """Split learning (``paradigm = "split"``): where the model is cut, the schedule, who holds
    the labels, the protections on what crosses the cut, server pre-training and leakage
    measures. ``cut = ""`` takes the task's default cut; a ``head_cut`` makes it U-shaped."""

    cut: str | int = ""
    head_cut: str | int = ""
    schedule: Literal["vanilla", "splitfed"] = "vanilla"
    labels: Literal["client", "server"] = "client"
    activation_noise: float = field(default=0.0, metadata=_check(min=0))
    gradient_noise: float = field(default=0.0, metadata=_check(min=0))
    nopeek_alpha: float = field(default=0.0, metadata=_check(min=0))
    pretrain_examples: int = field(default=0, metadata=_check(min=0))
    pretrain_epochs: int = field(default=1, metadata=_check(min=1))
    leakage: bool = True
    decoder_every: int = field(default=0, metadata=_check(min=0))
    decoder_examples: int = field(default=200, metadata=_check(min=2))


@dataclass
class SwarmConfig:
    """Swarm learning (``paradigm = "swarm"``; :mod:`shoal.algorithms.swarm`): how peers merge
    a round's updates (``merge``; ``trim_beta`` for the trimmed mean), the fewest updates a
    round merges (``min_peers``; 0: every peer), how long peers wait for the others before
    closing a round with fewer (``close_timeout_s``, deployment), and the job's name on the
    ledger (``job``). Deployment: the etcd ``endpoints`` and each peer's ``identity_dir`` (``shoal swarm enroll`` writes it), ``listen`` (where the peer
    serves its blobs; port 0 picks a free one) and ``advertise`` (the address others fetch
    from; default: the listen address)."""

    merge: Literal["mean", "median", "trimmed_mean", "geometric_median"] = "mean"
    trim_beta: float = field(default=0.1, metadata=_check(min=0))
    min_peers: int = field(default=0, metadata=_check(min=0))
    close_timeout_s: float = field(default=60.0, metadata=_check(min=0))
    job: str = "shoal"
    endpoints: list[str] = field(default_factory=list)
    identity_dir: str = ""
    listen: str = "127.0.0.1:0"
    advertise: str = ""

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.job):
            raise ConfigError(
                f"config field 'swarm.job': {self.job!r} cannot name a job on the ledger (its "
                "entries live under ROOT/peers/DEVICE/JOB/ROUND/KIND); use letters, digits, "
                "'.', '_' and '-', at most 64 characters, starting with a letter or digit, "
                "e.g. \"clinics-2026\".")


@dataclass
class AttackConfig:
    """Malicious participants in simulation (:mod:`shoal.attacks`): ``kind`` of attack by a
    ``fraction`` of the clients (federated) or peers (swarm), chosen from the seed. ``scale``:
    sign flip's and ``scaled``'s factor; ``sigma``: the Gaussian attack's std; ``z``: ALIE's
    (0: the paper's from the numbers of clients and attackers); ``epsilon``: IPM's; the
    backdoor's ``target`` class, ``boost`` (model replacement) and trigger (a ``trigger_size``
    square of pixels, or the first ``trigger_size`` features, set to ``trigger_value``)."""

    kind: Literal["none", "label_flip", "sign_flip", "scaled", "gaussian", "free_rider", "alie",
                  "ipm", "backdoor"] = "none"
    fraction: float = field(default=0.1, metadata=_check(gt=0, max=1))
    scale: float = field(default=1.0, metadata=_check(gt=0))
    sigma: float = field(default=1.0, metadata=_check(gt=0))
    z: float = field(default=0.0, metadata=_check(min=0))
    epsilon: float = field(default=0.5, metadata=_check(gt=0))
    target: int = field(default=0, metadata=_check(min=0))
    boost: float = field(default=10.0, metadata=_check(gt=0))
    trigger_size: int = field(default=3, metadata=_check(min=1))
    trigger_value: float = 1.0


@dataclass
class AuditConfig:
    """Privacy audits of the run (:mod:`shoal.audits`).

    ``capture_rounds`` keeps what the coordinator (federated) or the first peer (swarm)
    received in those rounds (``RUN/<paradigm>/views/``) for the inversion audit.
    ``canaries`` plants that many mislabelled copies of training examples in random clients'
    data, each with probability 1/2 drawn from a secure source (``RUN/audit/``), for the one-run
    lower bound on ε (audit ``"epsilon"``). ``shadow_models`` (even) is LiRA's number of shadow
    models (audit ``"lira"``). ``run`` lists the audits to run when the run ends, as
    ``shoal audit RUN_DIR`` does, into ``RUN/audit.json``."""

    capture_rounds: list[int] = field(default_factory=list, metadata=_check(min=1))
    canaries: int = field(default=0, metadata=_check(min=0))
    shadow_models: int = field(default=8, metadata=_check(min=2))
    run: list[Literal["inversion", "membership", "lira", "epsilon"]] = field(
        default_factory=list)

    def __post_init__(self) -> None:
        if self.shadow_models % 2:
            raise ConfigError(
                f"config field 'audit.shadow_models': {self.shadow_models} is odd; LiRA trains "
                "each candidate into exactly half of the shadow models, so it needs an even "
                f"number (e.g. {self.shadow_models + 1}).")
        if "epsilon" in self.run and not self.canaries:
            raise ConfigError(
                "config field 'audit.run': \"epsilon\" (the one-run lower bound on ε) needs "
                "canaries planted in training, but audit.canaries = 0; set audit.canaries "
                "(e.g. 1000).")


@dataclass
class LoggingConfig:
    """Where metrics go besides ``RUN/<paradigm>/metrics.jsonl`` (:mod:`shoal.loggers`).

    ``tensorboard``: TensorBoard event files in ``RUN/<paradigm>/tensorboard`` (needs
    ``pip install 'shoal[tensorboard]'``). ``mlflow``: one MLflow run per paradigm in experiment
    ``mlflow_experiment``, at ``mlflow_uri`` ("" = a local file store, ``RUN/mlruns``; needs
    ``pip install 'shoal[mlflow]'``)."""

    tensorboard: bool = False
    mlflow: bool = False
    mlflow_uri: str = ""
    mlflow_experiment: str = "shoal"

    def __post_init__(self) -> None:
        from .loggers import require_package  # the check the loggers make themselves

        if self.tensorboard:
            require_package("tensorboard", "logging.tensorboard")
        if self.mlflow:
            require_package("mlflow", "logging.mlflow")


@dataclass
class Config:
    """A whole run; see the module docstring for the file format. ``seeds``, when not empty,
    runs the whole job once per seed instead of once with ``seed`` (:mod:`shoal.seeds`)."""

    seed: int = field(default=0, metadata=_check(min=0))
    seeds: list[int] = field(default_factory=list, metadata=_check(min=0))
    paradigm: Literal["federated", "centralized", "data_parallel", "split",
                      "swarm"] = "federated"
    baseline: bool = True
    out_dir: str = "runs"
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data_parallel: DataParallelConfig = field(default_factory=DataParallelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# -- parsing ---------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                problems: list[str] | None = None) -> Config:
    """Read a TOML config (``None``: the built-in default), apply ``key=value`` overrides,
    validate every field, and return it.

    Every bad field is reported, not only the first: one bad field raises a
    :class:`~shoal.errors.ConfigError` with its message, several raise one that lists them all
    (see :func:`problems_error`). Given a ``problems`` list, the messages are appended to it
    instead and the config returned holds the default of every bad field (so that
    :func:`shoal.validate_config.config_problems` can look for more)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a TOML "
                              "file, or no file to run the built-in default.")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}.") from e
    return parse_config(apply_overrides(data, overrides), problems)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``section.field=value`` pairs (values in TOML syntax; bare words are strings)."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. federated.rounds=5.")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section.")
        node[leaf] = value
    return out


def parse_config(data: dict[str, Any], problems: list[str] | None = None) -> Config:
    """Validate a config given as nested dicts (as read from TOML); ``problems`` as in
    :func:`load_config`."""
    data = _deep_copy(data)
    task = data.get("task")
    if isinstance(task, dict):  # [task]: name plus free-form task options
        data["task"] = {"name": task.get("name", TaskConfig.name),
                        "options": {k: v for k, v in task.items() if k != "name"}}
    found: list[str] = []
    config = _build(Config, data, "", found)
    if problems is not None:
        problems.extend(found)
    elif found:
        raise problems_error(found)
    return config


def problems_error(problems: Sequence[str]) -> ConfigError:
    """One :class:`~shoal.errors.ConfigError` for every problem of a config: a single
    problem's own message, or a numbered list of them all."""
    if len(problems) == 1:
        return ConfigError(problems[0])
    lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
    return ConfigError(f"config: {len(problems)} problems; fix them all before running:\n"
                       f"{lines}")


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"config section '{path or 'top level'}': expected a table, "
                        f"got {_show(data)}.")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            where = f"[{path}]" if path else "the top level"
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(
                f"config: unknown field '{_join(path, key)}'.{hint} "
                f"Known fields in {where}: {', '.join(fields)}."
            )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        where = _join(path, name)
        tp = hints[name]
        try:
            if dataclasses.is_dataclass(tp):
                kwargs[name] = _build(typing.cast(type, tp), data[name], where, problems)
            else:
                kwargs[name] = _value(tp, data[name], where, f.metadata.get("check", {}))
        except ConfigError as e:
            problems.append(str(e))
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a __post_init__ rule: report it, keep the section's defaults
        problems.append(str(e))
        return cls()


def _value(tp: Any, value: Any, where: str, check: dict[str, Any]) -> Any:
    expected, ok, value = _coerce(tp, value)
    if not ok:
        raise ConfigError(f"config field '{where}': expected {expected}, got {_show(value)}.")
    if typing.get_origin(tp) is list:  # each item against the field's range
        (item,) = typing.get_args(tp)
        return [_value(item, v, f"{where}[{i}]", check) for i, v in enumerate(value)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config field '{where}': expected a finite number, got {value}.")
        for op, bound in check.items():
            bad = {"min": value < bound, "gt": value <= bound, "lt": value >= bound,
                   "max": value > bound}[op]
            if bad:
                rule = {"min": ">=", "gt": ">", "lt": "<", "max": "<="}[op]
                raise ConfigError(f"config field '{where}': expected a value {rule} {bound}, "
                                  f"got {value}.")
    return value


def _coerce(tp: Any, value: Any) -> tuple[str, bool, Any]:
    """``(what is expected, whether value fits, the value converted)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return "", True, None
        descriptions = []
        for opt in options:
            if opt is type(None):
                continue
            expected, ok, v = _coerce(opt, value)
            if ok:
                return expected, True, v
            descriptions.append(expected)
        return " or ".join(descriptions), False, value
    if origin is Literal:
        choices = typing.get_args(tp)
        return f"one of {', '.join(repr(c) for c in choices)}", value in choices, value
    if tp is bool:
        return "true or false", isinstance(value, bool), value
    if tp is int:
        return "an integer", isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return "a number", ok, float(value) if ok else value
    if tp is str:
        return "a string", isinstance(value, str), value
    if origin is dict:
        return "a table", isinstance(value, dict), value
    if origin is list:
        (item,) = typing.get_args(tp)
        expected = f"a list, each item {_coerce(item, None)[0]}"
        if not isinstance(value, list):
            return expected, False, value
        converted = [_coerce(item, v) for v in value]
        return expected, all(ok for _, ok, _ in converted), value
    raise TypeError(f"config: no rule for type {tp!r}")  # a bug in this module, not in the input


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def to_dict(config: Config) -> dict[str, Any]:
    """The config as nested dicts, in file form (``[task]`` options inlined, unset fields
    left out)."""
    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
    out = strip(dataclasses.asdict(config))
    out["task"] = {"name": config.task.name, **config.task.options}
    return out


def to_toml(config: Config) -> str:
    """The config as a TOML document that :func:`load_config` reads back to an equal config."""
    return tomli_w.dumps(to_dict(config))
