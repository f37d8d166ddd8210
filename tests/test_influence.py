"""One enrolled client must not control the model or the coordinator's counts (issue 19, 3)."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.algorithms.fedavg import FedAvg
from shoal.algorithms.influence import EXAMPLES_FACTOR, WeightCap, client_metrics
from shoal.config import load_config
from shoal.data.tasks import load_task
from shoal.errors import ConfigError
from shoal.experiment import build_federated, initial_params, make_dataset, resolve_config
from shoal.message import Message
from shoal.transport import FunctionTransport

HONEST = {"w": torch.tensor([0.01, -0.01])}


def _attack(weight: float, metrics: dict | None = None):
    """Clients a, b, c honest (weight 100); m claims ``weight`` with 0.5 everywhere."""
    def fn(m: Message) -> Message:
        if m.dst == "m":
            return m.reply(tensors={"w": torch.full((2,), 0.5)}, config={"weight": weight},
                           metrics=metrics or {})
        return m.reply(tensors=HONEST, config={"weight": 100.0},
                       metrics={"train/loss": 1.0, "train/examples": 100.0})
    return FunctionTransport(["a", "b", "c", "m"], fn)


def test_without_a_cap_one_client_replaces_the_model():
    """The attack of the issue, as a control: uncapped, weight 1e30 makes the update 0.5."""
    fedavg = FedAvg(None)  # type: ignore[arg-type]
    state, _ = fedavg.round(fedavg.init({"w": torch.zeros(2)}), _attack(1e30), 1)
    torch.testing.assert_close(state.params["w"], torch.full((2,), 0.5))


@pytest.mark.parametrize("claim", [1e30, 1e38, math.inf])
def test_a_capped_client_counts_as_its_assigned_examples(claim):
    """Capped at its assigned 100 examples, the attacker is one of four equal clients; 1e38
    (which overflowed the weighted sum) and inf are capped too; the clip is counted."""
    cap = WeightCap({"a": 100, "b": 100, "c": 100, "m": 100})
    fedavg = FedAvg(None, weight_cap=cap)  # type: ignore[arg-type]
    state, report = fedavg.round(fedavg.init({"w": torch.zeros(2)}), _attack(claim), 1)
    if math.isinf(claim):  # not a finite weight: dropped with its reason before any cap
        assert "weight must be a finite number" in report.dropped["m"]
        torch.testing.assert_close(state.params["w"], HONEST["w"])
        return
    expected = (3 * HONEST["w"] + torch.full((2,), 0.5)) / 4
    torch.testing.assert_close(state.params["w"], expected)
    assert report.metrics["round/weights_capped"] == 1.0
    assert report.failed is None


def test_a_client_outside_the_partition_is_capped_at_the_median_assignment():
    cap = WeightCap({"a": 10, "b": 300, "c": 40})
    assert cap.cap("a") == 10 and cap.cap("stranger") == 40
    assert cap.clip("a", 5) == (5, False) and cap.clip("a", 11) == (10, True)
    assert WeightCap(fixed=50).cap("anyone") == 50


def test_client_metrics_never_overwrite_the_coordinators_counts():
    """A reply claiming round/replied = 1000 and 1e12 examples: the coordinator's counts stay
    its own, the examples are clipped to EXAMPLES_FACTOR x the cap, the refusal is counted."""
    cap = WeightCap({"a": 100, "b": 100, "c": 100, "m": 100})
    fedavg = FedAvg(None, weight_cap=cap)  # type: ignore[arg-type]
    lies = {"round/replied": 1000.0, "round/sampled": 1e9, "comm/bytes_up": 0.0,
            "update/norm": 0.0, "dp/epsilon": 0.0, "train/examples": 1e12, "train/loss": 0.5}
    _, report = fedavg.round(fedavg.init({"w": torch.zeros(2)}), _attack(100.0, lies), 1)
    m = report.metrics
    assert m["round/replied"] == 4.0 and m["round/sampled"] == 4.0
    assert "comm/bytes_up" not in m and "dp/epsilon" not in m
    assert m["train/examples"] == 3 * 100.0 + EXAMPLES_FACTOR * 100
    assert m["round/metrics_refused"] == 5.0
    assert m["train/loss"] == pytest.approx((3 * 1.0 + 0.5) / 4)


def test_client_metrics_refuse_non_numbers_and_other_namespaces():
    kept, refused = client_metrics({"train/loss": 0.3, "train/steps": float("nan"),
                                    "client/own": 2, "round": 9, "train/flag": True,
                                    "time/round_s": 1.0}, cap=None)
    assert kept == {"train/loss": 0.3, "client/own": 2.0}
    assert refused == 4


def test_weight_cap_refuses_nonsense():
    with pytest.raises(ValueError, match="exactly one of assigned"):
        WeightCap()
    with pytest.raises(ValueError, match="finite number > 0"):
        WeightCap(fixed=0)
    with pytest.raises(ValueError, match="finite number of examples > 0"):
        WeightCap({"a": 0})


def _built(*sets: str):
    config = load_config(None, ["federated.rounds=1", "data.num_clients=4", *sets])
    task = load_task(config.task.name, **config.task.options)
    config = resolve_config(config, task)
    model, _ = initial_params(config, task)
    dataset = make_dataset(config, task)
    return build_federated(config, task, dataset, model)[0], dataset


def test_the_built_algorithm_caps_at_the_assigned_examples_by_default():
    algorithm, dataset = _built()
    assert algorithm.weight_cap is not None
    for cid in dataset.client_ids():
        assert algorithm.weight_cap.cap(cid) == dataset.num_examples(cid)
    fixed, _ = _built("federated.max_weight=250")
    assert fixed.weight_cap is not None and fixed.weight_cap.cap("client-0") == 250


def test_federated_max_weight_with_secure_aggregation_is_refused():
    with pytest.raises(ConfigError, match="set secagg.max_weight instead"):
        _built("federated.max_weight=250", "secagg.enabled=true")
