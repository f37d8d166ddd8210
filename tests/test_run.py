"""The run loop, callbacks, checkpoints, and resume == uninterrupted."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shoal import tree
from shoal.aggregate import adam
from shoal.algorithms.cohort import cohort
from shoal.algorithms.fedavg import FedAvg
from shoal.callbacks import CentralEvaluation, EarlyStopping, FederatedEvaluation, MetricsLog
from shoal.checkpoint import (
    Checkpoint,
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    unflatten_state,
)
from shoal.client import local_sgd
from shoal.errors import CheckpointError, ConfigError
from shoal.metrics import Evaluator
from shoal.run import run
from shoal.sim import InProcessTransport, simulated_dropout

from .conftest import cross_entropy, sgd


def _setup(tiny, seed=3):
    model = tiny.model()
    fedavg = FedAvg(local_sgd(model, cross_entropy, batch_size=8, optimizer=sgd(0.1)),
                    cohort=cohort(3), server_opt=adam(0.05), seed=seed,
                    client_eval=Evaluator(model, cross_entropy))
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, fedavg.handlers(),
                                   mods=[simulated_dropout(0.2, seed)])
    return model, fedavg, transport


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny, tmp_path):
    model, fedavg, transport = _setup(tiny)
    params = tree.params_of(model)
    full = run(fedavg, transport, rounds=6, params=params)

    class Crash:
        def after_round(self, ctx, report):
            if report.round == 3:
                raise KeyboardInterrupt

    model2, fedavg2, transport2 = _setup(tiny)
    with pytest.raises(KeyboardInterrupt):
        run(fedavg2, transport2, rounds=6, params=params,
            callbacks=[Checkpoint(tmp_path), Crash()])
    round_, state, extra = load_checkpoint(latest_checkpoint(tmp_path), fedavg2.init(params))
    assert round_ == 3 and [h["round"] for h in extra["history"]] == [1, 2, 3]
    model3, fedavg3, transport3 = _setup(tiny)
    resumed = run(fedavg3, transport3, rounds=6, state=state, start_round=4,
                  history=extra["history"])
    assert tree.equal(resumed.state.params, full.state.params)  # bit-identical
    for k in ("m", "v"):
        assert tree.equal(resumed.state.opt_state[k], full.state.opt_state[k])
    assert [h["round"] for h in resumed.history] == list(range(1, 7))


def test_same_seed_same_params_other_seed_differs(tiny):
    results = []
    for seed in (3, 3, 4):
        model, fedavg, transport = _setup(tiny, seed)
        results.append(run(fedavg, transport, rounds=2, params=tree.params_of(model)).state.params)
    assert tree.equal(results[0], results[1])
    assert not tree.equal(results[0], results[2])


def test_callbacks_see_metrics_and_can_stop(tiny, tmp_path):
    model, fedavg, transport = _setup(tiny)
    ev = Evaluator(model, cross_entropy)
    log = MetricsLog(tmp_path / "m.jsonl")
    stopper = EarlyStopping("central/accuracy", patience=1, mode="min")  # stops soon
    res = run(fedavg, transport, rounds=10, params=tree.params_of(model), callbacks=[
        CentralEvaluation(lambda p: ev(p, tiny.test)), FederatedEvaluation(every=2), log, stopper])
    assert res.stopped and res.stopped.startswith("early stopping: central/accuracy")
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(lines) == res.rounds == len(res.history)
    h = res.history[1]
    for key in ("central/accuracy", "fed_eval/accuracy", "fed_eval/accuracy_worst",
                "fed_eval/accuracy_p10", "comm/bytes_down", "comm/bytes_up", "train/loss"):
        assert key in h, key
    assert h["fed_eval/accuracy_worst"] <= h["fed_eval/accuracy_p10"] <= 1.0


def test_before_round_stop_prevents_the_round(tiny):
    model, fedavg, transport = _setup(tiny)

    class Budget:
        def before_round(self, ctx, r):
            return "budget spent" if r == 3 else None

    res = run(fedavg, transport, rounds=5, params=tree.params_of(model), callbacks=[Budget()])
    assert res.rounds == 2 and res.stopped == "budget spent"


def test_run_needs_exactly_one_of_params_and_state(tiny):
    model, fedavg, transport = _setup(tiny)
    with pytest.raises(ConfigError, match="pass exactly one of params"):
        run(fedavg, transport, rounds=1)


@dataclasses.dataclass
class _S:
    a: dict
    b: list
    c: tuple


def test_state_flatten_round_trip_keeps_types_and_bits():
    state = _S({"x": torch.randn(3), 1: {"y": torch.arange(4)}}, [1.5, "s", None, True],
               (torch.zeros(2, 2), 7))
    tensors, skeleton = flatten_state(state)
    back = unflatten_state(skeleton, tensors, state)
    assert isinstance(back, _S) and isinstance(back.c, tuple)
    assert torch.equal(back.a["x"], state.a["x"]) and torch.equal(back.a[1]["y"], state.a[1]["y"])
    assert back.b == state.b and back.c[1] == 7


def test_checkpoint_keeps_the_newest_and_refuses_foreign_state(tmp_path):
    from shoal.checkpoint import save_checkpoint
    for r in range(1, 5):
        save_checkpoint(tmp_path, r, {"w": torch.full((2,), float(r))}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000003", "round-000004"]
    r, state, _ = load_checkpoint(latest_checkpoint(tmp_path), None)
    assert r == 4 and state["w"].tolist() == [4.0, 4.0]
    with pytest.raises(CheckpointError, match="saved state has a dataclass"):
        save_checkpoint(tmp_path, 5, _S({}, [], ()))
        load_checkpoint(latest_checkpoint(tmp_path), {"w": None})
    with pytest.raises(CheckpointError, match="cannot save a object"):
        save_checkpoint(tmp_path, 6, {"w": object()})


def test_a_round_short_of_replies_is_retried_not_counted():
    """A round with fewer than min_replies valid replies runs again (before_round hooks
    first), and only the attempt that succeeds is recorded, with round/retries."""
    from shoal.transport import FunctionTransport

    online = {"a"}
    calls: list[int] = []

    class Wait:
        def before_round(self, ctx, r):
            calls.append(r)
            if len(calls) == 3:  # the second retry finds client b back
                online.add("b")

    def fn(m):
        if m.dst not in online:
            return m.failed("offline")
        return m.reply(tensors={"w": torch.ones(1)}, config={"weight": 1.0})

    fedavg = FedAvg(None, min_replies=2)  # type: ignore[arg-type]
    res = run(fedavg, FunctionTransport(["a", "b"], fn), rounds=1,
              params={"w": torch.zeros(1)}, callbacks=[Wait()], round_retries=3)
    assert calls == [1, 1, 1]
    assert len(res.history) == 1 and res.history[0]["round/retries"] == 2.0
    assert "round/failed" not in res.history[0]
    assert torch.equal(res.state.params["w"], torch.ones(1))
    online.discard("b")
    calls.clear()
    res = run(fedavg, FunctionTransport(["a", "b"], fn), rounds=1,
              params={"w": torch.zeros(1)}, callbacks=[Wait()], round_retries=1)
    assert res.history[0]["round/failed"] == 1.0 and res.history[0]["round/retries"] == 1.0
    assert torch.equal(res.state.params["w"], torch.zeros(1))
