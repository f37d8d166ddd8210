"""Whole-config validation: every problem at once, before anything runs or is written."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib

import pytest

from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.experiment import run_experiment
from shoal.validate_config import check_config, config_problems, load_checked


def test_shoal_config_lists_all_five_mistakes_and_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shoal", "config", "--set", "federated.rouds=3",
         "--set", "secagg.enabled=true", "--set", "federated.reducer=median",
         "--set", "task.bogus=1", "--set", "client.optimizer=Sgdx",
         "--set", "privacy.mode=sample"],
        capture_output=True, text=True, timeout=120, env={"COLUMNS": "1000", "PATH": ""})
    assert proc.returncode == 2 and proc.stdout == ""
    text = " ".join(proc.stderr.split())
    assert text.startswith("error: config: 5 problems; fix them all before running: 1. config: "
                           "unknown field 'federated.rouds'. Did you mean 'rounds'?")
    for expected in [
        "2. config field 'federated.reducer': secure aggregation (secagg.enabled = true) "
        "reveals only the sum of the updates, which federated.reducer = \"median\" cannot "
        "reduce (it needs each update); set federated.reducer = \"mean\", or secagg.enabled = "
        "false to keep the robust reducer.",
        "3. config field 'client.optimizer': optimizer: unknown torch optimizer 'Sgdx'; "
        "expected one of ",
        "4. config field 'task.bogus': task 'digits' has no option 'bogus'; its options are "
        "task.hidden, task.layers.",
        "5. config [privacy]: privacy.mode = \"sample\" (DP-SGD) needs noise: set "
        "privacy.noise_multiplier > 0, or privacy.target_epsilon > 0 to calibrate it to the "
        "planned rounds.",
    ]:
        assert expected in text


def test_load_checked_raises_one_error_with_every_problem() -> None:
    with pytest.raises(ConfigError) as e:
        load_checked(None, ["federated.rounds=0", "task.bogus=1"])
    assert str(e.value) == (
        "config: 2 problems; fix them all before running:\n"
        "  1. config field 'federated.rounds': expected a value >= 1, got 0.\n"
        "  2. config field 'task.bogus': task 'digits' has no option 'bogus'; its options are "
        "task.hidden, task.layers.")
    assert config_problems(load_config(None)) == []


@pytest.mark.parametrize("paradigm", ["split", "centralized", "data_parallel"])
def test_settings_a_paradigm_does_not_implement_are_errors(paradigm, tmp_path) -> None:
    config = load_config(None, [f"paradigm={paradigm}", "privacy.mode=user",
                                "privacy.noise_multiplier=1.0", "secagg.enabled=true"])
    with pytest.raises(ConfigError) as e:
        run_experiment(config, tmp_path / "run")
    assert str(e.value) == (
        "config: 2 problems; fix them all before running:\n"
        f"  1. config field 'privacy.mode': paradigm = \"{paradigm}\" does not implement "
        "differential privacy, so privacy.mode = \"user\" would not be applied; set "
        "privacy.mode = \"off\", or paradigm = \"federated\" (with baseline = true the "
        "centralized baseline runs beside it, without DP).\n"
        f"  2. config field 'secagg.enabled': paradigm = \"{paradigm}\" does not implement "
        "secure aggregation, so secagg.enabled = true would not be applied; set "
        "secagg.enabled = false, or paradigm = \"federated\".")
    assert not (tmp_path / "run").exists()


def test_a_clamped_cohort_is_logged_and_recorded_as_applied(tmp_path, caplog) -> None:
    config = load_config(None, ["federated.clients_per_round=50", "federated.rounds=1",
                                "client.epochs=1", "baseline=false"])
    with caplog.at_level(logging.WARNING, logger="shoal.experiment"):
        (result,) = run_experiment(config, tmp_path)
    assert ("federated.clients_per_round = 50 exceeds the 20 clients of the federation; every "
            "round takes all 20, and the run records federated.clients_per_round = 20"
            ) in caplog.text
    assert result.history[0]["round/sampled"] == 20
    recorded = tomllib.loads((tmp_path / "config.toml").read_text())
    assert recorded["federated"]["clients_per_round"] == 20


def test_too_few_clients_for_the_reducer_names_the_fields() -> None:
    with pytest.raises(ConfigError) as e:
        check_config(load_config(None, ["federated.reducer=krum", "federated.clients_per_round=4"]))
    assert str(e.value) == (
        "config field 'federated.clients_per_round': 4 gives 4 of the 20 clients per round, but "
        "federated.reducer = \"krum\" needs 5 updates; sample at least 5 clients per round, or "
        "lower the requirement.")


def test_an_unknown_primary_metric_is_a_config_problem() -> None:
    """`shoal config` checks evaluation.primary against the task's metrics, as `shoal run`
    does before it creates the run directory."""
    problems = config_problems(load_config(None, ["evaluation.primary=rmse"]))
    assert problems == [
        "config field 'evaluation.primary': 'rmse' is not a metric of task 'digits'; expected "
        "one of loss, accuracy, f1 (a classification task). A metric of your own goes into "
        "your task's Task(metrics={name: fn}), run with task.name = \"package.module:factory\"."]
    assert config_problems(load_config(None, ["evaluation.primary=accuracy"])) == []


def test_a_weight_cap_where_no_weight_is_used_is_refused() -> None:
    assert config_problems(load_config(None, ["paradigm=split", "federated.max_weight=50"])) == [
        "config field 'federated.max_weight': paradigm = \"split\" with split.schedule = "
        "\"vanilla\" does not weigh reported example counts, so federated.max_weight = 50 would "
        "not be applied; set federated.max_weight = 0, or paradigm = \"federated\" or "
        "split.schedule = \"splitfed\"."]
    assert config_problems(load_config(None, ["paradigm=centralized",
                                              "federated.max_weight=50"])) == [
        "config field 'federated.max_weight': paradigm = \"centralized\" does not weigh "
        "reported example counts, so federated.max_weight = 50 would not be applied; set "
        "federated.max_weight = 0, or paradigm = \"federated\"."]
    assert config_problems(load_config(None, ["paradigm=split", "split.schedule=splitfed",
                                              "federated.max_weight=50"])) == []
