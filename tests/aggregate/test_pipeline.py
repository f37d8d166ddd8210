"""Pipeline: order of the halves, coordinator-side stages, repr, secrecy checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from shoal import tree
from shoal.aggregate import (
    Pipeline,
    Stage,
    clip_by_norm,
    coordinate_median,
    krum,
    multi_krum,
    trimmed_mean,
    weighted_mean,
)
from shoal.errors import AggregationError
from shoal.types import ClientInfo, RoundInfo

ROUND = RoundInfo(round=3, seed=7, sampled=2, replied=2, population=10)
CLIENT = ClientInfo("c0", round=3, seed=11)


class Recorder(Stage):
    """Records every call in a shared log; the server half computes ``2 * x + offset`` so the
    composition order shows in the numbers too."""

    def __init__(self, name: str, log: list[str], offset: float = 0.0,
                 runs_at: str = "client"):
        self.name, self.log, self.offset, self.runs_at = name, log, offset, runs_at

    def __repr__(self) -> str:
        return f"rec({self.name!r})"

    def init(self) -> dict[str, Any]:
        return {"calls": 0}

    def client_config(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"name": self.name}

    def client(self, update, config: Mapping[str, Any], info: ClientInfo):
        assert config == {"name": self.name}  # each stage gets its own config
        self.log.append(f"client:{self.name}:{info.client_id}")
        return update

    def server(self, aggregate, state, info):
        self.log.append(f"server:{self.name}")
        out = {k: 2 * v + self.offset for k, v in aggregate.items()}
        return out, {"calls": state["calls"] + 1}, {f"{self.name}/calls": state["calls"] + 1}


class FakeSecureSum(Stage):
    """Stands in for secure aggregation: the coordinator sees only the sum."""

    hides_individual_updates = True

    def __repr__(self) -> str:
        return "secure_sum()"


def test_client_halves_in_order_server_halves_reversed():
    log: list[str] = []
    a, b = Recorder("a", log, offset=1.0), Recorder("b", log, offset=10.0)
    p = Pipeline([a, b], weighted_mean())
    states = p.init()
    configs = p.client_configs(states)
    assert configs == [{"name": "a"}, {"name": "b"}]
    u = p.client({"x": torch.tensor([1.0])}, configs, CLIENT)
    assert log == ["client:a:c0", "client:b:c0"]
    log.clear()
    out, new_states, metrics = p.aggregate([u, u], [1.0, 1.0], states, configs, ROUND)
    # Client-side halves ran on the clients, not again here; the server halves form a stack.
    assert log == ["server:b", "server:a"]
    # b first: 2 * 1 + 10 = 12; then a: 2 * 12 + 1 = 25 (a first would give 2 * 3 + 10 = 16).
    assert torch.equal(out["x"], torch.tensor([25.0]))
    assert new_states == [{"calls": 1}, {"calls": 1}] and states == [{"calls": 0}] * 2
    assert metrics == {"a/calls": 1, "b/calls": 1}


def test_coordinator_halves_run_per_update_in_order_before_the_reducer():
    log: list[str] = []
    a = Recorder("a", log, runs_at="coordinator")
    b = Recorder("b", log)  # client-side: the coordinator does not run it
    c = Recorder("c", log, runs_at="coordinator")
    p = Pipeline([a, b, c], weighted_mean())
    assert p.client_stages == (b,)
    states = p.init()
    xs = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([3.0])}]
    p.aggregate(xs, [1.0, 1.0], states, p.client_configs(states), ROUND, ["u0", "u1"])
    # Each coordinator-side half sees the ClientInfo of the update's sender.
    assert log == ["client:a:u0", "client:c:u0", "client:a:u1", "client:c:u1",
                   "server:c", "server:b", "server:a"]


def test_coordinator_clipping_is_applied_per_update():
    # [3, 4] has norm 5 and is clipped to [0.6, 0.8]; [0, 0.5] is under the bound.
    # The mean of the clipped updates is [0.3, 0.65]; clipping the mean of the raw updates
    # ([1.5, 2.25], norm ~2.7) would give ~[0.55, 0.83] instead.
    xs = [{"x": torch.tensor([3.0, 4.0])}, {"x": torch.tensor([0.0, 0.5])}]
    before = [tree.clone(x) for x in xs]
    p = Pipeline([clip_by_norm(1.0, runs_at="coordinator")], weighted_mean("uniform"))
    states = p.init()
    out, _, _ = p.aggregate(xs, [1.0, 1.0], states, p.client_configs(states), ROUND)
    assert torch.allclose(out["x"], torch.tensor([0.3, 0.65]), rtol=1e-6, atol=0)
    assert all(tree.equal(x, b) for x, b in zip(xs, before, strict=True))
    # A client-side clip is the clients' job: aggregate() does not clip again.
    p = Pipeline([clip_by_norm(1.0)], weighted_mean("uniform"))
    out, _, _ = p.aggregate(xs, [1.0, 1.0], p.init(), p.client_configs(p.init()), ROUND)
    assert torch.equal(out["x"], torch.tensor([1.5, 2.25]))
    assert torch.allclose(p.client(xs[0], [{}], CLIENT)["x"], torch.tensor([0.6, 0.8]))


def test_coordinator_clipping_bounds_an_attackers_pull_on_the_mean():
    honest = [{"x": torch.tensor([0.1, 0.0])} for _ in range(4)]
    attacker = {"x": torch.tensor([-1e6, 0.0])}
    p = Pipeline([clip_by_norm(1.0, runs_at="coordinator")], weighted_mean())
    out, _, _ = p.aggregate(honest + [attacker], [1.0] * 5, p.init(), [{}], ROUND)
    # The attacker's pull is at most max_norm / n: (4 * 0.1 - 1) / 5 = -0.12.
    assert torch.allclose(out["x"], torch.tensor([-0.12, 0.0]), rtol=1e-6, atol=1e-7)


def test_repr_prints_the_expression():
    assert repr(Pipeline([clip_by_norm(1)], weighted_mean())) == (
        "Pipeline([clip_by_norm(1)], weighted_mean())"
    )
    assert repr(Pipeline()) == "Pipeline([], weighted_mean())"
    assert repr(Pipeline([clip_by_norm(0.5, runs_at="coordinator"), clip_by_norm(2)],
                         multi_krum(1, 3))) == (
        "Pipeline([clip_by_norm(0.5, runs_at='coordinator'), clip_by_norm(2)], "
        "multi_krum(f=1, m=3))"
    )


@pytest.mark.parametrize("reducer", [coordinate_median(), krum(1), multi_krum(1, 2),
                                     trimmed_mean(0.1)], ids=repr)
def test_hidden_updates_need_a_linear_reducer(reducer):
    with pytest.raises(AggregationError) as e:
        Pipeline([clip_by_norm(1.0), FakeSecureSum()], reducer)
    assert str(e.value) == (
        f"{reducer!r} needs individual updates, but secure_sum() reveals only their sum; "
        "use weighted_mean()."
    )


def test_hidden_updates_krum_message_exactly():
    with pytest.raises(AggregationError) as e:
        Pipeline([FakeSecureSum()], krum(1))
    assert str(e.value) == (
        "krum(f=1) needs individual updates, but secure_sum() reveals only their sum; "
        "use weighted_mean()."
    )


def test_hidden_updates_forbid_coordinator_stages():
    for stages in ([clip_by_norm(1, runs_at="coordinator"), FakeSecureSum()],
                   [FakeSecureSum(), clip_by_norm(1, runs_at="coordinator")]):
        with pytest.raises(AggregationError) as e:
            Pipeline(stages, weighted_mean())
        assert str(e.value) == (
            "clip_by_norm(1, runs_at='coordinator') runs on each update at the coordinator, "
            "but secure_sum() reveals only their sum; run it on the clients (runs_at='client')."
        )


def test_hidden_updates_with_a_linear_reducer_and_client_stages_are_fine():
    for reducer in (weighted_mean(), weighted_mean("uniform")):
        Pipeline([clip_by_norm(1.0), FakeSecureSum()], reducer)


def test_pipeline_rejects_what_is_not_a_stage_or_reducer():
    with pytest.raises(AggregationError) as e:
        Pipeline(["clip"])  # type: ignore[list-item]
    assert str(e.value) == (
        "Pipeline: 'clip' is a str, expected a Stage (e.g. clip_by_norm(1.0))."
    )
    with pytest.raises(AggregationError) as e:
        Pipeline([], "mean")  # type: ignore[arg-type]
    assert str(e.value) == (
        "Pipeline: reducer 'mean' is a str, expected a Reducer (e.g. weighted_mean())."
    )
