"""Per-client anomaly scores: the median update is the crowd; strays are flagged."""

from __future__ import annotations

import pytest
import torch

import shoal
from shoal.aggregate.anomaly import NORM_RATIO, anomaly_scores


def _crowd(n: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": 1 + 0.05 * torch.randn(6, generator=g)} for _ in range(n)]


def test_honest_updates_are_not_flagged_and_strays_are():
    crowd = _crowd()
    flipped = {"w": -crowd[0]["w"]}
    boosted = {"w": 10 * crowd[1]["w"]}
    lazy = {"w": torch.zeros(6)}
    scores = anomaly_scores([*crowd, flipped, boosted, lazy])
    assert not any(a.flagged for a in scores[:8])
    assert all(a.cosine > 0.99 for a in scores[:8])
    assert scores[8].cosine < -0.99 and scores[8].flagged
    assert scores[9].norm_ratio > NORM_RATIO and scores[9].flagged
    assert scores[10].norm_ratio == 0.0 and scores[10].flagged
    assert anomaly_scores([]) == []


@pytest.mark.usefixtures("one_thread")
def test_a_robust_run_names_the_sign_flippers_in_its_metrics(tmp_path):
    (res,) = shoal.run_experiment(shoal.load_config(None, [
        "task.name=digits", "data.num_clients=10", "federated.clients_per_round=10",
        "federated.rounds=3", "baseline=false", "data.partition=iid",
        "federated.reducer=median", "attack.kind=sign_flip", "attack.fraction=0.2"]),
        tmp_path / "run")
    from shoal.attacks import choose_attackers
    attackers = choose_attackers([f"client-{i}" for i in range(10)], 0.2, 0)
    last = res.history[-1]
    assert last["anomaly/flagged"] == 2.0 and last["anomaly/cos_min"] < 0
    assert {k.removeprefix("anomaly/client/") for k in last
            if k.startswith("anomaly/client/")} == set(attackers)
