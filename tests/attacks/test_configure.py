"""``[attack]``: applied to federated and swarm runs from the config; refused where it would not
be applied."""

from __future__ import annotations

import pytest

import shoal
from shoal.attacks import Malicious
from shoal.experiment import (
    build_federated,
    build_swarm,
    initial_params,
    make_dataset,
    resolve_config,
)
from shoal.validate_config import config_problems

BASE = ["task.name=heart", "federated.rounds=2", "baseline=false",
        "federated.clients_per_round=4"]


def _built(overrides: list[str], builder=build_federated):
    config = shoal.load_config(None, [*BASE, *overrides])
    task = shoal.load_task("heart")
    config = resolve_config(config, task)
    model, _ = initial_params(config, task)
    return builder(config, task, make_dataset(config, task), model)[0]


def test_no_attack_leaves_the_client_update_alone():
    assert not isinstance(_built([]).client_update, Malicious)


@pytest.mark.parametrize("builder", [build_federated, build_swarm])
def test_the_attack_wraps_the_update_of_a_seeded_fraction(builder):
    paradigm = "federated" if builder is build_federated else "swarm"
    algo = _built([f"paradigm={paradigm}", "attack.kind=sign_flip", "attack.fraction=0.5",
                   "attack.scale=3"], builder)
    update = algo.client_update
    assert isinstance(update, Malicious) and len(update.attackers) == 2
    again = _built([f"paradigm={paradigm}", "attack.kind=sign_flip", "attack.fraction=0.5"],
                   builder).client_update
    assert update.attackers == again.attackers  # drawn from the seed


def test_a_sign_flipping_run_is_worse_than_a_clean_one(tmp_path):
    clean = shoal.run_experiment(shoal.load_config(None, [*BASE, "federated.rounds=5"]),
                                 tmp_path / "clean")[0].final["accuracy"]
    bad = shoal.run_experiment(shoal.load_config(None, [
        *BASE, "federated.rounds=5", "attack.kind=sign_flip", "attack.fraction=0.5",
        "attack.scale=5"]), tmp_path / "bad")[0].final["accuracy"]
    assert bad < clean


@pytest.mark.parametrize(("overrides", "message"), [
    (["paradigm=split", "attack.kind=sign_flip"],
     "config field 'attack.kind': in split learning a client sends activations, not model "
     "updates, so attack.kind = \"sign_flip\" would not be applied"),
    (["paradigm=split", "attack.kind=label_flip", "split.labels=server"],
     "with split.labels = \"server\" the server holds the labels"),
    (["paradigm=centralized", "attack.kind=label_flip"],
     "config field 'attack.kind': paradigm = \"centralized\" has no malicious participants"),
    (["attack.kind=alie", "federated.executor=processes"],
     "config field 'federated.executor': attack.kind = \"alie\" has its attackers collude in "
     "one process"),
    (["attack.kind=gaussian", "federated.algorithm=scaffold"],
     "config field 'attack.kind': federated.algorithm = \"scaffold\" needs client updates "
     "with gradient corrections"),
])
def test_attacks_where_they_would_not_be_applied_are_errors(overrides, message):
    config = shoal.load_config(None, [*BASE, *overrides])
    assert any(message in p for p in config_problems(config)), config_problems(config)


def test_a_malicious_swarm_peer_is_outvoted_by_robust_merging(tmp_path):
    peers = ["task.name=digits", "paradigm=swarm", "data.num_clients=5",
             "federated.clients_per_round=5", "federated.rounds=6", "baseline=false",
             "data.partition=iid", "attack.kind=sign_flip", "attack.fraction=0.2",
             "attack.scale=10"]
    mean = shoal.run_experiment(shoal.load_config(None, peers), tmp_path / "mean")[0]
    median = shoal.run_experiment(shoal.load_config(None, [*peers, "swarm.merge=median"]),
                                  tmp_path / "median")[0]
    assert median.final["accuracy"] > 0.8 > mean.final["accuracy"]


def test_attackers_act_under_secure_aggregation_too(tmp_path):
    # The coordinator sees only the masked sum, so it cannot inspect (or drop) the flipped
    # updates: FedAvg under secure aggregation is dragged down as plain FedAvg is.
    common = [*BASE, "federated.rounds=5", "secagg.enabled=true"]
    clean = shoal.run_experiment(shoal.load_config(None, common), tmp_path / "clean")[0]
    bad = shoal.run_experiment(shoal.load_config(None, [
        *common, "attack.kind=sign_flip", "attack.fraction=0.5", "attack.scale=5"]),
        tmp_path / "bad")[0]
    assert bad.final["accuracy"] < clean.final["accuracy"]


def test_a_split_learning_client_poisons_its_data(tmp_path):
    common = ["task.name=digits", "paradigm=split", "data.num_clients=4",
              "federated.clients_per_round=4", "federated.rounds=3", "baseline=false",
              "data.partition=iid", "split.leakage=false"]
    clean = shoal.run_experiment(shoal.load_config(None, common), tmp_path / "clean")[0]
    bad = shoal.run_experiment(shoal.load_config(None, [
        *common, "attack.kind=label_flip", "attack.fraction=0.75"]), tmp_path / "bad")[0]
    assert bad.final["accuracy"] < clean.final["accuracy"] - 0.2


def test_poisoned_data_changes_only_the_attackers_training_labels():
    from shoal.attacks.configure import poisoned_data
    config = shoal.load_config(None, ["task.name=heart", "attack.kind=label_flip",
                                      "attack.fraction=0.5"])
    task = shoal.load_task("heart")
    config = resolve_config(config, task)
    ds = make_dataset(config, task)
    data = poisoned_data(config, task, ds.client, ds.client_ids())
    changed = [c for c in ds.client_ids()
               if not bool((data(c).train.tensors()[1] == ds.client(c).train.tensors()[1]).all())]
    assert len(changed) == 2
    for c in changed:
        assert bool((data(c).train.tensors()[1] == 1 - ds.client(c).train.tensors()[1]).all())
        assert bool((data(c).eval.tensors()[1] == ds.client(c).eval.tensors()[1]).all())
