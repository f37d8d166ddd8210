"""Metrics into the ecosystem's tools: TensorBoard event files and MLflow runs.

Both are callbacks for :func:`shoal.run` that log every numeric metric of every round (the
training figures, the evaluations, traffic and time) at step = round, and are switched on by
the config's ``[logging]`` section (:class:`~shoal.config.LoggingConfig`)::

    [logging]
    tensorboard = true     # RUN/<paradigm>/tensorboard   (pip install 'shoal[tensorboard]')
    mlflow = true          # one MLflow run per paradigm  (pip install 'shoal[mlflow]')
    mlflow_uri = ""        # "" = a local file store, RUN/mlruns; or http://..., sqlite:///...

Neither package is a dependency of shoal: a config that enables a logger whose package is not
installed is a :class:`~shoal.errors.ConfigError` naming the extra to install.

A resumed run continues where it stopped: TensorBoard drops the events of rounds after the
checkpoint it resumes from (``purge_step``), and MLflow logs into the same MLflow run (its id is
kept in ``RUN/<paradigm>/mlflow_run_id``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .run import Callback, RunContext

if TYPE_CHECKING:
    from .algorithm import RoundReport
    from .config import Config

__all__ = ["EXTRAS", "MLflowLogger", "TensorBoardLogger", "metric_loggers", "numeric_metrics",
           "require_package"]

EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
"""Python package -> the extra of shoal that installs it (``pip install 'shoal[EXTRA]'``)."""

_WHAT = {"tensorboard": "TensorBoard", "mlflow": "MLflow"}


def require_package(package: str, field: str) -> None:
    """Raise a :class:`~shoal.errors.ConfigError` for config field ``field`` unless ``package``
    (a key of :data:`EXTRAS`) can be imported."""
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing(package, field)


def _missing(package: str, field: str) -> ConfigError:
    return ConfigError(
        f"config field '{field}': {_WHAT[package]} logging is on, but the {package!r} package "
        f"is not installed; install it with pip install 'shoal[{EXTRAS[package]}]', or set "
        f"{field} = false.")


def _import(package: str, module: str, field: str) -> Any:
    try:
        importlib.import_module(package)  # first: a cached submodule outlives its package
        return importlib.import_module(module)
    except ImportError as e:
        raise _missing(package, field) from e


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a round's metrics, without ``round`` (the step itself)."""
    return {k: float(v) for k, v in metrics.items()
            if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v)}


class _RoundLogger(Callback):
    """Logs each round's numbers once, and on run end what was added to the last round
    afterwards (the final central evaluation, when the last round was not evaluated)."""

    def __init__(self) -> None:
        self._last: tuple[int, set[str]] = (0, set())

    def _write(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def after_round(self, ctx: RunContext, report: RoundReport) -> None:
        """Log this round's metrics at step = round."""
        values = numeric_metrics(report.metrics)
        self._last = (report.round, set(values))
        if values:
            self._write(report.round, values)

    def _log_late(self, ctx: RunContext) -> None:
        if not ctx.history:
            return
        step, logged = self._last
        last = ctx.history[-1]
        if last.get("round") != step:
            return
        late = {k: v for k, v in numeric_metrics(last).items() if k not in logged}
        if late:
            self._write(step, late)


class TensorBoardLogger(_RoundLogger):
    """Write every round's metrics as scalars (tag = metric name, step = round) to TensorBoard
    event files in ``log_dir``, through ``torch.utils.tensorboard.SummaryWriter``; the resolved
    config goes in as text (tag ``config``) on a fresh run.

    View them with ``tensorboard --logdir RUN``."""

    def __init__(self, log_dir: str | os.PathLike, config_text: str = ""):
        super().__init__()
        self.log_dir = Path(log_dir)
        self.config_text = config_text
        self._writer: Any = None
        _import("tensorboard", "tensorboard", "logging.tensorboard")

    def on_run_start(self, ctx: RunContext) -> None:
        """Open the writer; a resumed run drops events after the round it resumes from."""
        module = _import("tensorboard", "torch.utils.tensorboard", "logging.tensorboard")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = module.SummaryWriter(
            log_dir=str(self.log_dir), purge_step=ctx.round + 1 if ctx.round else None)
        if not ctx.round and self.config_text:
            self._writer.add_text("config", "```\n" + self.config_text + "\n```", 0)

    def _write(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._writer.add_scalar(k, v, step)
        self._writer.flush()

    def on_run_end(self, ctx: RunContext) -> None:
        """Log the final evaluation if it came after the last round, and close the files."""
        if self._writer is not None:
            self._log_late(ctx)
            self._writer.close()
            self._writer = None


_NAME_OK = re.compile(r"[^\w\-. /]")


class MLflowLogger(_RoundLogger):
    """Log every round's metrics (step = round) to one MLflow run, through ``MlflowClient``.

    The run is named ``run_name`` in experiment ``experiment`` (created if missing) at
    ``tracking_uri``; ``params`` (the flattened config) are logged as its parameters and
    ``tags`` as its tags. The run's id is kept in ``id_file``, so a resumed run logs into the
    same MLflow run, and only the (metric, round) values that run does not hold yet (the
    rounds rerun after the last checkpoint are not logged twice). The run is marked finished
    when training ends.

    A ``file:`` tracking URI is a local file store: MLflow 3 asks for
    ``MLFLOW_ALLOW_FILE_STORE=true`` to use one, which is set for this process when unset.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, *,
                 params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
                 id_file: str | os.PathLike | None = None):
        super().__init__()
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = {k: str(v) for k, v in (params or {}).items()}
        self.tags = dict(tags or {})
        self.id_file = Path(id_file) if id_file is not None else None
        self.run_id: str | None = None
        self._client: Any = None
        self._logged: set[tuple[str, int]] = set()  # (metric, step) in the run (on resume)
        self._entities = _import("mlflow", "mlflow.entities", "logging.mlflow")

    def on_run_start(self, ctx: RunContext) -> None:
        """Open (or, resumed, reopen) the MLflow run and log the params and tags once."""
        tracking = _import("mlflow", "mlflow.tracking", "logging.mlflow")
        if self.tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = client = tracking.MlflowClient(tracking_uri=self.tracking_uri)
        if self.id_file is not None and self.id_file.exists():
            self.run_id = self.id_file.read_text().strip()
            client.update_run(self.run_id, status="RUNNING")
            # MLflow cannot delete a metric value: rounds the interrupted run logged after its
            # last checkpoint are rerun (bit-identical) and must not be logged twice.
            self._logged = {(key, m.step) for key in client.get_run(self.run_id).data.metrics
                            for m in client.get_metric_history(self.run_id, key)}
            return
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(
            self.experiment)
        run = client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        if self.id_file is not None:
            self.id_file.parent.mkdir(parents=True, exist_ok=True)
            self.id_file.write_text(self.run_id + "\n")
        items = [self._entities.Param(k[:250], v[:6000]) for k, v in self.params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            client.log_batch(self.run_id, params=items[i:i + 100])

    def _write(self, step: int, values: dict[str, float]) -> None:
        Metric = self._entities.Metric
        now = _now_ms()
        named = ((_NAME_OK.sub("_", k), v) for k, v in values.items())
        metrics = [Metric(k, v, now, step) for k, v in named if (k, step) not in self._logged]
        for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def on_run_end(self, ctx: RunContext) -> None:
        """Log the final evaluation if it came after the last round; mark the run finished."""
        if self._client is not None and self.run_id is not None:
            self._log_late(ctx)
            self._client.set_terminated(self.run_id, "FINISHED")


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def metric_loggers(config: Config, run_dir: str | os.PathLike, paradigm: str) -> list[Callback]:
    """The loggers ``config.logging`` enables for ``paradigm`` in run directory ``run_dir``
    (none by default)."""
    from .config import to_dict, to_toml

    lg = config.logging
    out = Path(run_dir) / paradigm
    loggers: list[Callback] = []
    if lg.tensorboard:
        loggers.append(TensorBoardLogger(out / "tensorboard", to_toml(config)))
    if lg.mlflow:
        uri = lg.mlflow_uri or (Path(run_dir) / "mlruns").resolve().as_uri()
        loggers.append(MLflowLogger(
            uri, lg.mlflow_experiment, f"{paradigm} seed {config.seed}",
            params=_flatten(to_dict(config)),
            tags={"shoal.paradigm": paradigm, "shoal.seed": str(config.seed),
                  "shoal.task": config.task.name,
                  "shoal.run_dir": str(Path(run_dir).resolve())},
            id_file=out / "mlflow_run_id"))
    return loggers
