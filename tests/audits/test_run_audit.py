"""``[audit]`` and ``shoal audit RUN_DIR``: the coordinator's captured view, attacked afterwards."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import shoal
from shoal.audits.run_audit import audit_run, first_dense_layer
from shoal.audits.views import load_views
from shoal.cli import app
from shoal.errors import CheckpointError, ConfigError
from shoal.validate_config import config_problems

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_STEP = ["task.name=digits", "data.num_clients=6", "federated.clients_per_round=6",
            "federated.rounds=2", "client.batch_size=1", "client.max_steps=1",
            "baseline=false", "audit.capture_rounds=[1]"]


def _run(tmp_path, extra=()):
    shoal.run_experiment(shoal.load_config(None, [*ONE_STEP, *extra]), tmp_path / "run")
    return tmp_path / "run"


def test_captured_views_are_exactly_the_updates_the_coordinator_received(tmp_path):
    run = _run(tmp_path)
    views = load_views(run / "federated" / "views" / "round-1.safetensors")
    assert sorted(views) == [(f"client-{i}", "train") for i in range(6)]
    assert not (run / "federated" / "views" / "round-2.safetensors").exists()


def test_one_step_updates_expose_every_client_and_dp_none(tmp_path):
    plain = audit_run(_run(tmp_path / "a"))["federated"]["inversion"]
    assert plain["clients_exposed"] == plain["clients_attacked"] == 6
    dp = audit_run(_run(tmp_path / "b", ["privacy.mode=sample",
                                         "privacy.noise_multiplier=1.0"]))
    assert dp["federated"]["inversion"]["clients_exposed"] == 0


def test_under_secure_aggregation_no_update_reaches_the_coordinator(tmp_path):
    got = audit_run(_run(tmp_path, ["secagg.enabled=true"]))["federated"]["inversion"]
    assert got["updates_attacked"] == 0 and got["clients_exposed"] == 0
    assert got["messages_by_kind"]["secagg.masked_input"] == 6


def test_the_cli_writes_audit_json_and_the_config_runs_it_at_the_end(tmp_path):
    run = _run(tmp_path, ["audit.run=[\"membership\"]"])
    first = json.loads((run / "audit.json").read_text())
    assert set(first["federated"]) == {"membership"}
    assert 0 <= first["federated"]["membership"]["auc"] <= 1
    out = CliRunner().invoke(app, ["audit", str(run), "--only", "inversion"])
    assert out.exit_code == 0, out.output
    assert "6 of 6 clients' inputs recovered exactly" in out.output
    assert set(json.loads((run / "audit.json").read_text())["federated"]) == {"inversion"}


def test_bad_audit_requests_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="holds no config.toml"):
        audit_run(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown audit\(s\) \['dlg'\]"):
        audit_run(tmp_path, ["dlg"])
    problems = config_problems(shoal.load_config(None, ["paradigm=split",
                                                        "audit.capture_rounds=[1]"]))
    assert any("config field 'audit.capture_rounds': paradigm = \"split\" has no coordinator"
               in p for p in problems)


def test_first_dense_layer():
    import torch
    assert first_dense_layer({"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3)}) == "0"
    assert first_dense_layer({"c.weight": torch.zeros(3, 1, 2, 2), "c.bias": torch.zeros(3),
                              "f.weight": torch.zeros(2, 3), "f.bias": torch.zeros(2)}) is None
