"""FLTrust (Cao et al. 2021): the coordinator's root update scores the clients' updates."""

from __future__ import annotations

import pytest

import shoal
from shoal.algorithms.fltrust import FLTrust
from shoal.data.arrays import ArrayData
from shoal.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["task.name=digits", "data.num_clients=10", "federated.clients_per_round=10",
        "federated.rounds=8", "baseline=false", "data.partition=iid"]


def _accuracy(tmp_path, name: str, overrides: list[str]) -> tuple[float, dict]:
    (res,) = shoal.run_experiment(shoal.load_config(None, [*BASE, *overrides]), tmp_path / name)
    return res.final["accuracy"], res.history[-1]


def test_fltrust_keeps_the_model_under_sign_flipping_that_breaks_fedavg(tmp_path):
    attack = ["attack.kind=sign_flip", "attack.fraction=0.3", "attack.scale=5"]
    fedavg, _ = _accuracy(tmp_path, "fedavg", attack)
    fltrust, last = _accuracy(tmp_path, "fltrust", [*attack, "federated.reducer=fltrust"])
    assert fltrust > 0.8 > fedavg
    # the three sign-flippers point away from the root update: no trust, every round
    assert last["fltrust/untrusted"] == 3.0


def test_fltrust_without_attackers_trusts_everyone(tmp_path):
    acc, last = _accuracy(tmp_path, "clean", ["federated.reducer=fltrust"])
    assert acc > 0.8 and last["fltrust/untrusted"] == 0.0 and last["fltrust/trust_min"] > 0


def test_fltrust_needs_root_data():
    import torch
    with pytest.raises(ConfigError, match="FLTrust: the root data set is empty"):
        FLTrust(lambda p, d, i: None, ArrayData(torch.zeros(3, 2), torch.zeros(3), torch.arange(0)))
