"""FedAvg: the reference oracle, exact weighting, validation of replies, dropouts."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from shoal import tree
from shoal.aggregate import Pipeline, krum
from shoal.algorithms.cohort import cohort
from shoal.algorithms.fedavg import FedAvg
from shoal.client import local_sgd
from shoal.data.arrays import ArrayData
from shoal.data.federated import ClientData
from shoal.errors import ConfigError
from shoal.message import Message
from shoal.sim import InProcessTransport, simulated_dropout
from shoal.transport import FunctionTransport

from .conftest import cross_entropy, make_tiny, sgd


def test_one_client_one_full_batch_step_equals_centralized_sgd(tiny):
    """Reference oracle: FedAvg with one client, one local step on its full data and server
    lr 1 is one step of plain SGD on that data."""
    model = tiny.model()
    data = tiny.data["client-0"].train
    n = len(data)
    fedavg = FedAvg(local_sgd(model, cross_entropy, batch_size=n, optimizer=sgd(0.3)))
    transport = InProcessTransport(["client-0"], tiny.data.__getitem__, fedavg.handlers())
    state = fedavg.init(tree.params_of(model))
    state, report = fedavg.round(state, transport, 1)
    assert report.failed is None

    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.3)
    x, y = data.tensors()
    cross_entropy(reference(x), y).backward()
    opt.step()
    expected = tree.params_of(reference)
    for k in expected:
        # Same math; the client sums the batch in shuffled order, so allow float rounding.
        torch.testing.assert_close(state.params[k], expected[k], rtol=1e-6, atol=1e-7)


def _fixed_reply(updates: dict[str, tuple[dict, float]]):
    def fn(m: Message) -> Message:
        upd, w = updates[m.dst]
        return m.reply(tensors=upd, config={"weight": w})
    return fn


def test_weighting_by_examples_is_exact():
    params = {"w": torch.zeros(2)}
    ups = {"a": ({"w": torch.tensor([1.0, 2.0])}, 1.0), "b": ({"w": torch.tensor([5.0, 6.0])}, 3.0)}
    fedavg = FedAvg(client_update=None)  # type: ignore[arg-type]  # replies are canned
    state, report = fedavg.round(fedavg.init(params), FunctionTransport(["a", "b"],
                                 _fixed_reply(ups)), 1)
    assert torch.equal(state.params["w"], torch.tensor([(1 + 15) / 4, (2 + 18) / 4]))
    assert report.metrics["round/replied"] == 2


def test_uniform_weighting():
    from shoal.aggregate import weighted_mean
    params = {"w": torch.zeros(1)}
    ups = {"a": ({"w": torch.tensor([1.0])}, 1.0), "b": ({"w": torch.tensor([3.0])}, 9.0)}
    fedavg = FedAvg(None, pipeline=Pipeline([], weighted_mean("uniform")))  # type: ignore[arg-type]
    state, _ = fedavg.round(fedavg.init(params), FunctionTransport(["a", "b"], _fixed_reply(ups)), 1)
    assert state.params["w"].item() == 2.0


@pytest.mark.parametrize("bad, reason", [
    ({"w": torch.tensor([float("nan"), 0.0])},
     "update: 'w' holds 1 non-finite value(s) (NaN or inf); expected finite numbers. "
     "Lower the learning rate or clip the update."),
    ({"w": torch.zeros(3)}, "update: 'w' has shape (3,), expected (2,)."),
    ({"w": torch.zeros(2, dtype=torch.float64)},
     "update: 'w' has dtype torch.float64, expected torch.float32."),
    ({"v": torch.zeros(2)}, "update does not match the model: missing 'w'; unexpected 'v'. "
     "Send one tensor per model parameter, named as in the model's state_dict."),
])
def test_bad_update_is_dropped_with_reason_and_never_applied(bad, reason):
    params = {"w": torch.zeros(2)}
    ups = {"good": ({"w": torch.ones(2)}, 1.0), "bad": (bad, 1.0)}
    fedavg = FedAvg(None)  # type: ignore[arg-type]
    state, report = fedavg.round(fedavg.init(params), FunctionTransport(["bad", "good"],
                                 _fixed_reply(ups)), 1)
    assert report.dropped == {"bad": reason}
    assert torch.equal(state.params["w"], torch.ones(2))  # only the good update counted


def test_replies_for_another_round_or_from_another_node_are_rejected():
    params = {"w": torch.zeros(1)}

    def fn(m: Message) -> Message:
        r = m.reply(tensors={"w": torch.ones(1)}, config={"weight": 1.0})
        if m.dst == "replay":
            r.round = m.round - 1
        if m.dst == "spoof":
            r.src = "someone-else"
        if m.dst == "noweight":
            r.config = {}
        return r

    fedavg = FedAvg(None)  # type: ignore[arg-type]
    _, report = fedavg.round(fedavg.init(params),
                             FunctionTransport(["noweight", "ok", "replay", "spoof"], fn), 5)
    assert report.dropped == {
        "replay": "reply is for 'train' round 4, expected 'train' round 5",
        "spoof": "reply from 'someone-else' answers a request sent to 'spoof'",
        "noweight": "weight must be a finite number > 0, got None",
    }


def test_too_few_replies_fails_the_round_and_keeps_the_model():
    params = {"w": torch.zeros(1)}
    fedavg = FedAvg(None, min_replies=2)  # type: ignore[arg-type]
    state0 = fedavg.init(params)
    state, report = fedavg.round(state0, FunctionTransport(
        ["a", "b"], lambda m: m.failed("offline") if m.dst == "a"
        else m.reply(tensors={"w": torch.ones(1)}, config={"weight": 1.0})), 1)
    assert report.failed == "only 1 valid replies of 2 sampled; min_replies is 2"
    assert report.dropped == {"a": "offline"}
    assert state is state0


def test_min_replies_below_what_the_reducer_needs_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        FedAvg(None, pipeline=Pipeline([], krum(1)), min_replies=2)  # type: ignore[arg-type]
    assert str(e.value) == ("FedAvg: min_replies is 2, but krum(f=1) needs at least 5 updates; "
                            "set min_replies >= 5.")


def test_failing_client_is_dropped_and_round_goes_on(tiny, caplog):
    model = tiny.model()
    fedavg = FedAvg(local_sgd(model, cross_entropy, optimizer=sgd(0.1)))

    def data_fn(cid):
        if cid == "client-1":  # wrong feature count: the model raises inside the client
            return ClientData(ArrayData(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long),
                                        torch.arange(4)), None)
        return tiny.data[cid]

    transport = InProcessTransport(tiny.ids, data_fn, fedavg.handlers())
    state, report = fedavg.round(fedavg.init(tree.params_of(model)), transport, 3)
    assert list(report.dropped) == ["client-1"]
    assert report.dropped["client-1"].startswith(
        "ClientError: client 'client-1' failed in round 3 at local step 0: RuntimeError: ")
    assert report.metrics["round/replied"] == 3 and report.failed is None
    assert "client-1 dropped from round 3" in caplog.text


def test_simulated_dropout_is_reproducible_and_logged(tiny):
    model = tiny.model()
    t = make_tiny(clients=20, per_client=10)
    fedavg = FedAvg(local_sgd(model, cross_entropy, optimizer=sgd(0.1)), seed=7)
    mods = [simulated_dropout(0.3, seed=7)]
    dropped = []
    for _ in range(2):
        transport = InProcessTransport(t.ids, t.data.__getitem__, fedavg.handlers(), mods=mods)
        _, report = fedavg.round(fedavg.init(tree.params_of(model)), transport, 1)
        dropped.append(report.dropped)
    assert dropped[0] == dropped[1] and 1 <= len(dropped[0]) <= 12
    assert set(dropped[0].values()) == {"simulated dropout (rate 0.3)"}


def test_cohort_sampling_and_metrics(tiny):
    model = tiny.model()
    fedavg = FedAvg(local_sgd(model, cross_entropy, optimizer=sgd(0.1)), cohort=cohort(2))
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, fedavg.handlers())
    _, report = fedavg.round(fedavg.init(tree.params_of(model)), transport, 1)
    m = report.metrics
    assert m["round/sampled"] == 2 and m["round/replied"] == 2
    assert m["train/examples"] == 2 * 25
    assert math.isfinite(m["train/loss"]) and m["update/norm"] > 0


def test_fedprox_pulls_updates_towards_the_global_model(tiny):
    model = tiny.model()
    params = tree.params_of(model)
    norms = {}
    for mu in (0.0, 10.0):
        fedavg = FedAvg(local_sgd(model, cross_entropy, epochs=3, batch_size=5,
                                  optimizer=sgd(0.05), prox_mu=mu))
        transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, fedavg.handlers())
        _, report = fedavg.round(fedavg.init(params), transport, 1)
        norms[mu] = report.metrics["update/norm"]
    assert norms[10.0] < 0.8 * norms[0.0]


def test_client_infos_of_a_cohort_equal_client_info_of_each(tiny):
    algorithm = FedAvg(local_sgd(tiny.model, cross_entropy, optimizer=sgd(0.1)), seed=11)
    msgs = [Message("train", "coordinator", f"client-{i:03d}", 4, {}, {"stages": []})
            for i in range(30)]
    assert algorithm.client_infos(msgs) == [algorithm.client_info(m, m.dst) for m in msgs]

    class Reseeded(FedAvg):
        def client_seed(self, round: int, client_id: str) -> int:
            return round  # a subclass's own seeds are kept

    other = Reseeded(algorithm.client_update, seed=11)
    assert [i.seed for i in other.client_infos(msgs)] == [4] * 30
