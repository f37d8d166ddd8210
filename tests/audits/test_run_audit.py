"""``[audit]`` and ``shoal audit RUN_DIR``: the coordinator's captured view, attacked afterwards."""

from __future__ import annotations

import json

import pytest
import torch
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


SWARM = ["paradigm=swarm", "swarm.close_timeout_s=5"]


def test_a_swarm_peer_s_view_exposes_the_other_peers_one_step_updates(tmp_path):
    run = _run(tmp_path, SWARM)
    got = audit_run(run, ["inversion"])["swarm"]["inversion"]
    assert got["messages_by_kind"].get("swarm.blob", 0) >= 5
    # client-0 is the observing peer: it fetched the five others' update blobs.
    assert got["clients_exposed"] == 5 and "client-0" not in got["exposed"]


def _canary_run(tmp_path, extra=()):
    cfg = shoal.load_config(None, [
        "task.name=digits", "data.num_clients=4", "federated.clients_per_round=4",
        "federated.rounds=10", "client.epochs=10", "client.lr=0.3", "baseline=false",
        "data.eval_fraction=0", "audit.canaries=200", *extra])
    shoal.run_experiment(cfg, tmp_path / "run")
    return tmp_path / "run"


def test_canaries_are_planted_from_a_secret_draw_and_kept_on_resume(tmp_path):
    from shoal.audits.planted import load_canaries, plant_canaries
    from shoal.experiment import make_dataset

    short = ["federated.rounds=1", "client.epochs=1"]
    a, b = _canary_run(tmp_path / "a", short), _canary_run(tmp_path / "b", short)
    ca, cb = load_canaries(a), load_canaries(b)
    assert ca is not None and cb is not None and len(ca) == 200
    # The same config and seed, yet another draw: whoever holds the config cannot know it.
    assert not torch.equal(ca.included, cb.included)
    assert (ca.y != torch.as_tensor(0)).any()
    cfg = shoal.load_config(a / "config.toml")
    task = shoal.load_task("digits")
    plain = make_dataset(cfg, task)
    planted = plant_canaries(cfg, task, plain, a, resume=True)  # read back, not redrawn
    added = sum(planted.num_examples(c) - plain.num_examples(c) for c in plain.client_ids())
    assert added == int(ca.included.sum())
    assert torch.equal(load_canaries(a).included, ca.included)


def test_the_one_run_bound_never_exceeds_the_accountant_and_sees_plain_memorisation(tmp_path):
    plain = audit_run(_canary_run(tmp_path / "plain"), ["epsilon"])["federated"]["epsilon"]
    assert plain["eps_accountant"] is None and plain["consistent"] is None
    assert plain["eps_lower_bound"] > 0.5  # mislabelled canaries are memorised without DP
    dp = audit_run(_canary_run(tmp_path / "dp", ["privacy.mode=sample",
                                                 "privacy.noise_multiplier=1.0",
                                                 "federated.rounds=3", "client.epochs=2"]),
                   ["epsilon"])["federated"]["epsilon"]
    assert dp["consistent"] is True
    assert dp["eps_lower_bound"] <= dp["eps_accountant"]
    assert dp["verdict"].startswith("consistent")


def test_lira_against_the_run_reports_roc_and_the_dp_bound(tmp_path):
    run = _canary_run(tmp_path, ["audit.canaries=0", "federated.rounds=3", "client.epochs=2",
                                 "privacy.mode=sample",
                                 "privacy.noise_multiplier=1.0", "audit.shadow_models=4"])
    got = audit_run(run, ["lira", "membership"])["federated"]
    lira = got["lira"]
    assert lira["shadow_models"] == 4 and lira["shadow_recipe"] == "DP-SGD"
    assert 0 <= lira["auc"] <= 1 and lira["within_dp_bound"] is True
    for audit in (lira, got["membership"]):
        roc = audit["roc"]
        assert len(roc["fpr"]) == len(roc["tpr"]) <= 200
        assert roc["fpr"][0] == 0 and roc["fpr"][-1] == roc["tpr"][-1] == 1


def test_audit_settings_that_cannot_apply_are_errors():
    with pytest.raises(ConfigError, match=r"'audit.shadow_models': 5 is odd"):
        shoal.load_config(None, ["audit.shadow_models=5"])
    with pytest.raises(ConfigError, match=r"needs canaries planted in training, but "
                                          r"audit.canaries = 0"):
        shoal.load_config(None, ["audit.run=[\"epsilon\"]"])
    problems = config_problems(shoal.load_config(None, ["task.name=cmapss",
                                                        "audit.canaries=10"]))
    assert any("canaries are mislabelled examples, but task 'cmapss' is a regression" in p
               for p in problems)


def test_auditing_a_run_directory_runs_no_code_its_config_names(tmp_path):
    # A run directory someone else wrote: its config names code as the task.
    run = tmp_path / "theirs"
    run.mkdir()
    marker = tmp_path / "ran"
    (run / "config.toml").write_text(
        f'[task]\nname = "os:system"\n[task.options]\ncommand = "touch {marker}"\n')
    with pytest.raises(ConfigError, match=r"the task 'os:system' is code named by .*config.toml, "
                                          r"and rebuilding it would run that code"):
        audit_run(run)
    out = CliRunner().invoke(app, ["audit", str(run)])
    assert isinstance(out.exception, ConfigError) and "--trust-code" in str(out.exception)
    assert not marker.exists()
