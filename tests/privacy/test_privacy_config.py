"""The [privacy] config section, wired through `shoal run`."""

from __future__ import annotations

import json

import pytest

from shoal.config import PrivacyConfig, load_config, parse_config, to_toml
from shoal.errors import ConfigError
from shoal.experiment import run_experiment
from shoal.validate_config import check_config, config_problems

USER = ["privacy.mode=user", "federated.weighting=uniform", "federated.sampling=poisson",
        "federated.clients_per_round=0.5", "privacy.noise_multiplier=2.0",
        "federated.rounds=6", "client.epochs=1", "baseline=false", "privacy.accountant=rdp"]


def test_section_defaults_and_round_trip():
    config = load_config(None, ["privacy.mode=user", "privacy.target_epsilon=3"])
    assert config.privacy == PrivacyConfig(mode="user", target_epsilon=3.0)
    assert PrivacyConfig().mode == "off"
    assert parse_config({}).privacy == PrivacyConfig()
    import tomllib
    assert parse_config(tomllib.loads(to_toml(config))) == config


def test_bad_privacy_fields_are_named():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["privacy.mode=central"])
    assert str(e.value) == ("config field 'privacy.mode': expected one of 'off', 'sample', "
                            "'user', 'distributed', got 'central' (str).")
    with pytest.raises(ConfigError, match=r"'privacy.delta': expected a value < 1, got 1.5"):
        load_config(None, ["privacy.delta=1.5"])


def test_user_level_run_reports_epsilon_and_stops_at_the_budget(tmp_path):
    config = load_config(None, USER + ["privacy.target_epsilon=2.5"])
    (result,) = run_experiment(config, tmp_path)
    eps = [h["dp/epsilon"] for h in result.history]
    assert eps == sorted(eps) and eps[-1] <= 2.5
    assert result.rounds < 6
    assert result.stopped.startswith(f"privacy budget: round {result.rounds + 1} would raise ε")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["results"][0]["stopped"] == result.stopped
    assert summary["config"]["privacy"]["mode"] == "user"


def test_user_level_needs_the_uniform_mean_and_noise(tmp_path):
    config = load_config(None, [u for u in USER if "weighting" not in u])
    with pytest.raises(ConfigError) as e:
        run_experiment(config, tmp_path / "run")
    assert str(e.value) == (
        "config [privacy]: privacy.mode = \"user\" (DP-FedAvg) needs the uniform mean, but "
        "federated.reducer = \"mean\" and federated.weighting = \"examples\": set "
        "federated.reducer = \"mean\" and federated.weighting = \"uniform\".")
    config = load_config(None, [u for u in USER if "noise" not in u])
    with pytest.raises(ConfigError) as e:
        run_experiment(config, tmp_path / "run")
    assert str(e.value) == (
        "config [privacy]: privacy.mode = \"user\" (DP-FedAvg) needs noise: set "
        "privacy.noise_multiplier > 0, or privacy.target_epsilon > 0 to calibrate it to the "
        "planned rounds.")
    assert not (tmp_path / "run").exists()


def test_user_level_requirements_are_stated_together_before_the_run(tmp_path):
    with pytest.raises(ConfigError) as e:
        run_experiment(load_config(None, ["privacy.mode=user"]), tmp_path / "run")
    assert str(e.value) == (
        "config [privacy]: privacy.mode = \"user\" (DP-FedAvg) needs 3 things this config "
        "lacks: (1) noise: set privacy.noise_multiplier > 0, or privacy.target_epsilon > 0 to "
        "calibrate it to the planned rounds; (2) a cohort the accountant can account: "
        "federated.sampling = \"fixed\" draws cohorts of a fixed size, which only the RDP "
        "accountant accounts, but privacy.accountant = \"auto\" is PLD: set federated.sampling "
        "= \"poisson\" (with a fraction in federated.clients_per_round, e.g. 0.5) or "
        "privacy.accountant = \"rdp\"; (3) the uniform mean, but federated.reducer = \"mean\" "
        "and federated.weighting = \"examples\": set federated.reducer = \"mean\" and "
        "federated.weighting = \"uniform\".")
    assert not (tmp_path / "run").exists()
    # the three fixes named, nothing else is needed
    fixed = ["privacy.mode=user", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp",
             "federated.weighting=uniform"]
    assert config_problems(load_config(None, fixed)) == []


def test_a_budget_spent_before_the_first_round_is_a_config_error(tmp_path):
    """The README's old DP-SGD command: σ = 1 spends ε = 8.6 in round 1, over a budget of 5."""
    overrides = ["privacy.mode=sample", "privacy.noise_multiplier=1.0",
                 "privacy.target_epsilon=5"]
    with pytest.raises(ConfigError) as e:
        run_experiment(load_config(None, overrides), tmp_path / "run")
    assert str(e.value) == (
        "config field 'privacy.target_epsilon': the budget ε = 5 (δ = 1e-05) is spent before "
        "round 1: with privacy.noise_multiplier = 1 the first round alone would raise ε to 8.62 "
        "(PLD accountant), so the run would stop without training. privacy.noise_multiplier = "
        "5.90 spends at most ε = 5 over the 30 planned rounds (federated.rounds): set it, or "
        "privacy.noise_multiplier = 0 to calibrate it, or raise privacy.target_epsilon.")
    assert not (tmp_path / "run").exists()
    assert config_problems(load_config(None, [*overrides[:2], "privacy.target_epsilon=9"])) == []
    assert config_problems(load_config(None, [overrides[0], "privacy.noise_multiplier=5.9",
                                              overrides[2]])) == []


def test_privacy_settings_without_a_privacy_mode_are_refused():
    with pytest.raises(ConfigError) as e:
        check_config(load_config(None, ["privacy.target_epsilon=5"]))
    assert str(e.value) == (
        "config field 'privacy.target_epsilon': 5 is set, but privacy.mode = \"off\" trains "
        "without differential privacy, so it would not be applied; set privacy.mode = "
        "\"sample\", \"user\" or \"distributed\", or remove the field.")


def test_calibrated_noise_spends_the_target_over_the_planned_rounds(tmp_path):
    config = load_config(None, [u for u in USER if "noise" not in u]
                         + ["privacy.target_epsilon=4", "federated.rounds=3"])
    (result,) = run_experiment(config, tmp_path)
    assert result.rounds == 3 and result.stopped is None
    assert result.history[-1]["dp/epsilon"] == pytest.approx(4.0, rel=0.01)


def test_sample_level_run_trains_with_dp_sgd(tmp_path):
    config = load_config(None, ["privacy.mode=sample", "privacy.noise_multiplier=1.0",
                                "privacy.accountant=rdp", "federated.rounds=2",
                                "client.epochs=1", "baseline=false",
                                "privacy.grad_sample_mode=hooks"])
    (result,) = run_experiment(config, tmp_path)
    assert result.rounds == 2
    for h in result.history:
        assert h["dp/noise_multiplier"] == 1.0 and h["dp/epsilon"] > 0
    assert result.history[1]["dp/epsilon"] > result.history[0]["dp/epsilon"]


def test_resume_with_adaptive_clipping_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    from shoal import tree
    config = load_config(None, USER + ["federated.rounds=4", "privacy.adaptive_clipping=true",
                                       "privacy.count_stddev=2.0", "privacy.noise_multiplier=1.0",
                                       "privacy.reproducible=true"])
    full = run_experiment(config, tmp_path / "full")

    class Interrupt:
        def after_round(self, ctx, report):
            if report.round == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut", callbacks=lambda p, r: [Interrupt()])
    resumed = run_experiment(config, tmp_path / "cut", resume=True)
    a = load_file(str(tmp_path / "full" / "federated" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "federated" / "model.safetensors"))
    assert tree.equal(a, b)
    keys = ("dp/epsilon", "dp/clip_norm")
    assert [[h[k] for k in keys] for h in resumed[0].history] == \
        [[h[k] for k in keys] for h in full[0].history]
    assert full[0].history[-1]["dp/clip_norm"] != 1.0  # the clip norm adapted and was restored


def test_a_noise_multiplier_the_accountant_cannot_handle_is_refused_up_front():
    from shoal.data.tasks import load_task
    from shoal.experiment import build_federated, make_dataset, resolve_config
    from shoal.privacy import configure

    config = load_config(None, ["privacy.mode=sample", "privacy.noise_multiplier=0.0001"])
    task = load_task("digits")
    config = resolve_config(config, task)
    algorithm, _ = build_federated(config, task, make_dataset(config, task), task.model_fn())
    with pytest.raises(ConfigError) as info:
        configure.dp_callback(config, algorithm, 20, lambda c: 50)
    assert str(info.value) == (
        "privacy: noise multiplier 0.0001 is below 0.25, where the PLD accountant's "
        "privacy-loss distribution needs tens of GiB to discretise (and such a run gives no "
        "meaningful privacy); use privacy.accountant = \"rdp\", or a noise multiplier of at "
        "least 0.25.")


def test_the_results_say_what_privacy_cost_and_whether_the_noise_was_secret(tmp_path):
    base = ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "federated.rounds=2",
            "baseline=false"]
    (secret,) = run_experiment(load_config(None, base), tmp_path / "a")
    p = secret.privacy
    assert p["epsilon"] == secret.history[-1]["dp/epsilon"] > 0
    assert (p["accountant"], p["delta"], p["noise"]) == ("pld", 1e-5, "secret")
    assert p["adjacency"] == "add or remove one example of one client"
    assert "warning" not in p
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["results"][0]["privacy"]["epsilon"] == p["epsilon"]
    (seeded,) = run_experiment(load_config(None, base + ["privacy.reproducible=true"]),
                               tmp_path / "b")
    assert seeded.privacy["noise"] == "reproducible"
    assert "not private against them" in seeded.privacy["warning"]
