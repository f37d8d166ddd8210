"""Whole runs from a config: outputs on disk, the baseline, resume == uninterrupted, and the
`shoal` command's behaviour on good and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from shoal import tree
from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.experiment import run_experiment

FAST = ["federated.rounds=4", "client.epochs=1", "federated.clients_per_round=5"]


def test_run_writes_outputs_and_baseline_sees_as_many_examples(tmp_path):
    results = run_experiment(load_config(None, FAST), tmp_path)
    fed, cen = results
    assert (fed.paradigm, cen.paradigm) == ("federated", "centralized")
    for p in ("federated", "centralized"):
        for f in ("metrics.jsonl", "model.safetensors", "costs.json"):
            assert (tmp_path / p / f).exists()
    assert (tmp_path / "config.toml").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["paradigm"] for r in summary["results"]] == ["federated", "centralized"]
    # Round by round the baseline trains on at least as many examples as the federation, and
    # at most one batch more.
    for hf, hc in zip(fed.history, cen.history, strict=True):
        assert 0 <= hc["train/examples"] - hf["train/examples"] < 16
    assert fed.history[0]["central/accuracy"] < fed.final["accuracy"] <= 1  # it learns
    assert "fed_eval/accuracy_worst" in fed.final
    assert fed.bytes > 0 and cen.bytes > 0  # the baseline uploads the clients' data


def test_resume_after_interrupt_is_bit_identical(tmp_path):
    config = load_config(None, FAST + ["federated.dropout=0.2"])
    run_experiment(config, tmp_path / "full")

    class Interrupt:
        def after_round(self, ctx, report):
            if report.round == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut",
                       callbacks=lambda p, r: [Interrupt()] if p == "federated" else [])
    assert not (tmp_path / "cut" / "federated" / "model.safetensors").exists()
    run_experiment(config, tmp_path / "cut", resume=True)
    for p in ("federated", "centralized"):
        a = load_file(str(tmp_path / "full" / p / "model.safetensors"))
        b = load_file(str(tmp_path / "cut" / p / "model.safetensors"))
        assert tree.equal(a, b), p
    lines = (tmp_path / "cut" / "federated" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3, 4]


def test_unknown_task_and_option_and_missing_data(tmp_path):
    with pytest.raises(ConfigError, match="load_task: unknown task 'mnist'; expected one of "):
        run_experiment(load_config(None, ["task.name=mnist"]), tmp_path)
    with pytest.raises(ConfigError, match="config field 'task.depth': task 'digits' has no "
                                          "option 'depth'; its options are task.hidden, "
                                          "task.layers."):
        run_experiment(load_config(None, ["task.depth=3"]), tmp_path)
    with pytest.raises(ConfigError, match="config \\[task\\]: fashion_mnist: data directory .* "
                                          "does not exist.*apt-get install dataset-fashion-mnist"):
        run_experiment(load_config(None, ["task.name=fashion_mnist",
                                          f"task.data_dir='{tmp_path}/none'"]), tmp_path)


def test_krum_needs_enough_clients_per_round(tmp_path):
    with pytest.raises(ConfigError) as e:
        run_experiment(load_config(None, ["federated.reducer=krum", "federated.krum_f=2",
                                          "federated.clients_per_round=5"]), tmp_path)
    assert str(e.value) == (
        "config field 'federated.clients_per_round': 5 gives 5 of the 20 clients per round, "
        "but federated.reducer = \"krum\" needs 7 updates; sample at least 7 clients per "
        "round, or lower the requirement.")


def _shoal(*args, cwd):
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


def test_cli_runs_and_summarises(tmp_path):
    p = _shoal("run", "-q", "--out", str(tmp_path / "r"), *sum([["--set", s] for s in FAST], []),
               "--set", "baseline=false", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "shoal run summary" in p.stdout and "federated" in p.stdout
    assert (tmp_path / "r" / "federated" / "model.safetensors").exists()


def test_cli_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    p = _shoal("run", "--set", "federated.rounds=zero", cwd=tmp_path)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "config field 'federated.rounds': expected an integer, got 'zero' (str)." in p.stderr
    p = _shoal("run", "--resume", str(tmp_path / "nothing"), cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
