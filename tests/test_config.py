"""Config validation: every bad field gets an error naming the field, the expected and the got."""

from __future__ import annotations

import tomllib

import pytest

from shoal.config import Config, load_config, parse_config, to_toml
from shoal.errors import ConfigError


@pytest.mark.parametrize("override, message", [
    ("federated.rouds=3", "config: unknown field 'federated.rouds'. Did you mean 'rounds'? "
     "Known fields in [federated]: algorithm, rounds, clients_per_round, sampling, min_replies, dropout, "
     "timeout_s, on_client_error, weighting, reducer, trim_beta, krum_f, krum_m, root_examples, clip_norm, "
     "clip_at, server_opt, server_lr, server_momentum, beta1, beta2, tau, max_weight, executor, workers, "
     "worker_executor."),
    ("federated.rounds=ten", "config field 'federated.rounds': expected an integer, "
     "got 'ten' (str)."),
    ("federated.rounds=0", "config field 'federated.rounds': expected a value >= 1, got 0."),
    ("client.lr=-1", "config field 'client.lr': expected a value > 0, got -1.0."),
    ("federated.reducer=avg", "config field 'federated.reducer': expected one of 'mean', "
     "'median', 'trimmed_mean', 'krum', 'multi_krum', 'geometric_median', 'fltrust', got 'avg' (str)."),
    ("baseline=1", "config field 'baseline': expected true or false, got 1 (int)."),
    ("data=3", "config section 'data': expected a table, got 3 (int)."),
    ("federated.clients_per_round=2.5", "config field 'federated.clients_per_round': expected "
     "a count (an integer >= 1) or a fraction in (0, 1], got 2.5."),
    ("federated.clients_per_round=fast", "config field 'federated.clients_per_round': expected "
     "an integer or a number, got 'fast' (str)."),
    ("data.alpha=nan", "config field 'data.alpha': expected a finite number, got nan."),
    ("sed=1", "config: unknown field 'sed'. Did you mean 'seed'? Known fields in the top level: "
     "seed, seeds, paradigm, baseline, out_dir, task, data, federated, client, evaluation, "
     "checkpoint, secagg, privacy, network, data_parallel, split, swarm, attack, audit, logging."),
    ("rounds", "--set 'rounds': expected key=value, e.g. federated.rounds=5."),
])
def test_bad_fields_name_field_expected_and_got(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.toml")
    assert str(e.value) == (f"config file '{tmp_path / 'nope.toml'}' does not exist; pass the "
                            "path of a TOML file, or no file to run the built-in default.")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federated\nrounds = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)


def test_file_and_overrides_and_task_options(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('seed = 4\n[task]\nname = "fashion_mnist"\nmodel = "mlp"\n'
                 '[federated]\nrounds = 7\nclients_per_round = 0.1\n')
    c = load_config(f, ["federated.rounds=9", "client.optimizer=Adam"])
    assert (c.seed, c.federated.rounds, c.federated.clients_per_round) == (4, 9, 0.1)
    assert c.task.name == "fashion_mnist" and c.task.options == {"model": "mlp"}
    assert c.client.optimizer == "Adam"


def test_toml_round_trip():
    c = load_config(None, ["task.hidden=64", "data.alpha=0.3", "federated.reducer=krum"])
    assert parse_config(tomllib.loads(to_toml(c))) == c
    assert parse_config({}) == Config()


@pytest.mark.parametrize("job", ["", "team/a", "-x", "a" * 65])
def test_a_swarm_job_name_that_cannot_name_ledger_keys_is_refused(job):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"swarm.job={job}"])
    assert str(e.value) == (
        f"config field 'swarm.job': {job!r} cannot name a job on the ledger (its entries live "
        "under ROOT/peers/DEVICE/JOB/ROUND/KIND); use letters, digits, '.', '_' and '-', at "
        "most 64 characters, starting with a letter or digit, e.g. \"clinics-2026\".")
