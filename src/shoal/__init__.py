"""shoal: train models on data that never leaves its owners.

The public API, by layer (see the README for a tour)::

    params math      tree, Params
    data             ArrayData, FederatedDataset, ClientData, federate, load_task, Task, ...
    clients          local_sgd, ClientUpdate, ClientInfo, ClientResult, optimizer_fn
    aggregation      Pipeline, Stage, clip_by_norm, Reducer, weighted_mean, coordinate_median,
                     trimmed_mean, krum, multi_krum, ServerOpt, sgd, momentum, adam, yogi, adagrad
    conversations    Message, Node, NodeContext, Transport, InProcessTransport, FunctionTransport
    algorithms       Algorithm, FedAvg, Scaffold, Centralized, cohort
    the loop         run, RunResult, Callback, CentralEvaluation, FederatedEvaluation,
                     MetricsLog, EarlyStopping, Checkpoint, Evaluator
    whole runs       Config, load_config, run_experiment
    privacy          dp_sgd, dp_fedavg, PrivacyAccounting, calibrate_noise_multiplier

Subpackages with their own API: ``shoal.secagg`` (SecureFedAvg, secure_aggregation),
``shoal.split`` (SplitLearning, cut_model, GradientNoise, NoPeek), ``shoal.sim`` (executors),
``shoal.net`` (GrpcTransport, NodeClient, CertificateAuthority), ``shoal.data_parallel``.
"""

from . import data_parallel as _data_parallel  # noqa: F401  (registers paradigm "data_parallel")
from . import errors, split, tree  # split registers paradigm "split"
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
    weighted_mean,
    yogi,
)
from .algorithm import Algorithm, RoundReport
from .algorithms.centralized import Centralized
from .algorithms.cohort import Cohort, cohort
from .algorithms.fedavg import FedAvg, FedAvgState
from .algorithms.influence import WeightCap
from .algorithms.scaffold import Scaffold, ScaffoldState
from .algorithms.swarm import Swarm
from .callbacks import CentralEvaluation, EarlyStopping, FederatedEvaluation, MetricsLog
from .checkpoint import Checkpoint
from .client import ClientUpdate, local_sgd, optimizer_fn
from .config import Config, load_config
from .data import ArrayData, ClientData, FederatedDataset, Task, federate, load_task, register_task
from .errors import ShoalError
from .experiment import run_experiment
from .message import Message
from .metrics import Evaluator
from .node import Node, NodeContext
from .privacy import PrivacyAccounting, calibrate_noise_multiplier, dp_fedavg, dp_sgd
from .run import Callback, RunResult, run
from .seeding import derive_seed
from .sim import Executor, InProcessTransport, make_executor, simulated_dropout
from .transport import FunctionTransport, Transport
from .tree import Params
from .types import ClientInfo, ClientResult

__version__ = "0.1.0"

__all__ = [
    "Algorithm", "ArrayData", "Callback", "CentralEvaluation", "Centralized", "Checkpoint",
    "Executor", "make_executor",
    "ClientData", "ClientInfo", "ClientResult", "ClientUpdate", "Cohort", "Config",
    "EarlyStopping", "Evaluator", "FedAvg", "FedAvgState", "FederatedDataset",
    "FederatedEvaluation", "FunctionTransport", "InProcessTransport", "Message", "MetricsLog",
    "Node", "NodeContext", "Params", "Pipeline", "Reducer", "RoundReport", "RunResult",
    "Scaffold", "ScaffoldState", "ServerOpt", "ShoalError", "Stage", "Task", "Transport", "WeightCap", "adagrad", "adam", "clip_by_norm",
    "cohort", "coordinate_median", "derive_seed", "errors", "federate", "krum", "load_config",
    "load_task", "local_sgd", "momentum", "multi_krum", "optimizer_fn", "register_task", "run",
    "run_experiment", "sgd", "simulated_dropout", "split", "tree", "trimmed_mean", "weighted_mean",
    "yogi",
]
__all__ += ["Swarm", "geometric_median"]
__all__ += ["PrivacyAccounting", "calibrate_noise_multiplier", "dp_fedavg", "dp_sgd"]
