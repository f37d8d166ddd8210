"""Metrics into TensorBoard and MLflow: read back from the event files and the MLflow store,
round by round; a resumed run logs each round once (in MLflow too); a missing package is a config error that
says what to install."""

from __future__ import annotations

import json
import sys

import pytest

from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.experiment import run_experiment
from shoal.loggers import MLflowLogger, TensorBoardLogger

FAST = ["federated.rounds=3", "client.epochs=1", "client.max_steps=2",
        "federated.clients_per_round=3", "baseline=false", "evaluation.federated_every=1",
        "logging.tensorboard=true", "logging.mlflow=true"]


def _history(run_dir):
    lines = (run_dir / "federated" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def _tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "federated" / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _mlflow_metric(run_dir, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run_id = (run_dir / "federated" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    return run, sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path_factory.mktemp("logged")
    run_experiment(load_config(None, FAST), run_dir)
    yield run_dir
    mp.undo()


@pytest.mark.parametrize("tag", ["central/accuracy", "central/loss", "train/loss",
                                 "fed_eval/accuracy", "comm/bytes_up"])
def test_tensorboard_event_files_hold_every_round(logged, tag):
    expected = [(h["round"], pytest.approx(h[tag], rel=1e-6)) for h in _history(logged)]
    assert len(expected) == 3
    assert _tensorboard_scalars(logged, tag) == expected


@pytest.mark.parametrize("key", ["central/accuracy", "train/loss", "fed_eval/accuracy_worst"])
def test_mlflow_store_holds_every_round_and_the_config(logged, key):
    run, got = _mlflow_metric(logged, key)
    assert got == [(h["round"], pytest.approx(h[key])) for h in _history(logged)]
    assert run.info.status == "FINISHED" and run.info.run_name == "federated seed 0"
    assert run.data.params["federated.rounds"] == "3"
    assert run.data.params["task.name"] == "digits"
    assert run.data.tags["shoal.paradigm"] == "federated"


def test_a_resumed_run_logs_each_round_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config = load_config(None, FAST + ["federated.rounds=4", "checkpoint.every=2"])

    class Interrupt:  # after round 3 is logged, before it is checkpointed (every 2 rounds)
        def after_round(self, ctx, report):
            if report.round == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path, callbacks=lambda p, r: [Interrupt()])
    assert [s for s, _ in _tensorboard_scalars(tmp_path, "central/accuracy")] == [1, 2, 3]
    run_experiment(config, tmp_path, resume=True)
    history = _history(tmp_path)
    assert [h["round"] for h in history] == [1, 2, 3, 4]
    # TensorBoard drops the events of the rerun round 3 (purge_step), and holds the rerun's
    expected = [(h["round"], pytest.approx(h["central/accuracy"], rel=1e-6)) for h in history]
    assert _tensorboard_scalars(tmp_path, "central/accuracy") == expected
    # MLflow cannot delete a metric, so the resumed run logs only what the MLflow run lacks:
    # each round once (the rerun round 3 is bit-identical to the one logged before).
    for key in ("central/accuracy", "train/loss", "comm/bytes_up"):
        run, got = _mlflow_metric(tmp_path, key)
        assert got == [(h["round"], pytest.approx(h[key])) for h in history], key
    assert run.info.status == "FINISHED"


MISSING = ("config field 'logging.{field}': {what} logging is on, but the '{package}' package is "
           "not installed; install it with pip install 'shoal[{package}]', or set "
           "logging.{field} = false.")


@pytest.mark.parametrize("package, what", [("mlflow", "MLflow"), ("tensorboard", "TensorBoard")])
def test_enabled_but_not_installed_is_a_config_error_naming_the_extra(monkeypatch, package, what):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails
    expected = MISSING.format(field=package, what=what, package=package)
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"logging.{package}=true"])
    assert str(e.value) == expected
    load_config(None, [f"logging.{package}=false"])  # off: not needed
    with pytest.raises(ConfigError) as e:  # the loggers check too, when built directly
        if package == "mlflow":
            MLflowLogger("file:/nowhere", "shoal", "run")
        else:
            TensorBoardLogger("nowhere")
    assert str(e.value) == expected
