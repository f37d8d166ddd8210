"""Split learning trains the model it cut: oracles against unsplit training, SplitFed with one
client against vanilla, several clients, pre-training, and the message conversation."""

from __future__ import annotations

import torch
from torch import nn

from shoal import tree
from shoal.client import local_sgd
from shoal.data.arrays import ArrayData
from shoal.message import Message
from shoal.net.wire import HEADER, Assembler, decode_frame, encode_message
from shoal.run import run
from shoal.seeding import derive_seed
from shoal.sim import InProcessTransport
from shoal.split import KINDS, SplitLearning, cut_model
from shoal.types import ClientInfo

from ..conftest import cross_entropy, make_tiny, sgd


def deep_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(),
                         nn.Linear(12, 3))


def unsplit(model: nn.Module, params, data, *, seed: int, client: str, round: int = 1,
            epochs: int = 1, batch_size: int = 8, lr: float = 0.1):
    """Plain SGD of the whole model on the same batches a split client draws."""
    update = local_sgd(model, cross_entropy, epochs=epochs, batch_size=batch_size,
                       optimizer=sgd(lr))
    info = ClientInfo(client, round, derive_seed(seed, "client", round, client))
    return tree.add(params, update(params, data, info).update)


def transport_for(tiny, algo, ids=None):
    ids = ids or tiny.ids
    return InProcessTransport(ids, tiny.data.__getitem__, algo.handlers(), on_error="raise")


def assert_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), k


def test_oracle_vanilla_one_client_equals_unsplit_training():
    tiny = make_tiny(clients=1, per_client=40)
    model = deep_model()
    params0 = tree.params_of(model)
    algo = SplitLearning(cut_model(model, 1, input_shape=(8,)), cross_entropy, batch_size=8,
                         epochs=2, optimizer=sgd(0.1), seed=3)
    res = run(algo, transport_for(tiny, algo), params=params0, rounds=2)
    expected = params0
    for r in (1, 2):
        expected = unsplit(model, expected, tiny.data["client-0"].train, seed=3,
                           client="client-0", round=r, epochs=2)
    assert_close(algo.params(res.state), expected)
    assert not tree.equal(expected, params0)  # it trained
    assert res.history[-1]["train/examples"] == 2 * 35


def test_oracle_ushaped_one_client_equals_unsplit_training():
    tiny = make_tiny(clients=1, per_client=40)
    model = deep_model()
    params0 = tree.params_of(model)
    split = cut_model(model, "1", "3", input_shape=(8,))
    assert split.ushaped and list(split.head.state_dict()) == ["4.weight", "4.bias"]
    algo = SplitLearning(split, cross_entropy, batch_size=8, optimizer=sgd(0.1), seed=5)
    sent: list[Message] = []
    transport = transport_for(tiny, algo)
    deliver = transport.deliver

    def spy(message, timeout, answer=None):
        reply = deliver(message, timeout, answer)
        sent.extend([message, reply])
        return reply

    transport.deliver = spy  # type: ignore[method-assign]
    res = run(algo, transport, params=params0, rounds=1)
    expected = unsplit(model, params0, tiny.data["client-0"].train, seed=5, client="client-0")
    assert_close(algo.params(res.state), expected)
    # The labels never reach the server: no message to it carries them, and nothing the
    # client sends is the labels tensor.
    assert {m.kind for m in sent} == set(KINDS)
    ups = [m for m in sent if m.kind == "split.forward" and m.src == "client-0"]
    assert ups and all(set(m.tensors) == {"activations"} for m in ups)
    assert all("labels" not in m.tensors for m in sent)


def test_splitfed_with_one_client_equals_vanilla():
    tiny = make_tiny(clients=1, per_client=40)
    model = deep_model()
    params0 = tree.params_of(model)
    out = {}
    for schedule in ("vanilla", "splitfed"):
        algo = SplitLearning(cut_model(model, "3", input_shape=(8,)), cross_entropy,
                             schedule=schedule, batch_size=8, optimizer=sgd(0.1), seed=1)
        out[schedule] = algo.params(run(algo, transport_for(tiny, algo), params=params0,
                                        rounds=3).state)
    assert_close(out["vanilla"], out["splitfed"], tol=1e-6)


def test_vanilla_hands_the_client_part_on_and_splitfed_averages_it():
    tiny = make_tiny(clients=3, per_client=30)
    model = deep_model()
    params0 = tree.params_of(model)
    split = cut_model(model, "1", input_shape=(8,))
    # Vanilla with turns = unsplit SGD through the clients' data one after the other.
    algo = SplitLearning(split, cross_entropy, batch_size=8, optimizer=sgd(0.1), seed=2)
    res = run(algo, transport_for(tiny, algo), params=params0, rounds=1)
    expected = params0
    for cid in tiny.ids:
        expected = unsplit(model, expected, tiny.data[cid].train, seed=2, client=cid)
    assert_close(algo.params(res.state), expected, tol=1e-5)
    # SplitFed: the client parts are averaged; accuracy improves over rounds.
    fed = SplitLearning(split, cross_entropy, schedule="splitfed", batch_size=8,
                        optimizer=sgd(0.1), seed=2)
    res = run(fed, transport_for(tiny, fed), params=params0, rounds=5)
    h = res.history
    assert h[0]["round/replied"] == 3 and h[-1]["train/loss"] < h[0]["train/loss"]
    assert h[-1]["comm/bytes_up"] > 0 and h[-1]["comm/bytes_down"] > 0


def test_server_pretraining_is_unsplit_training_on_the_servers_data():
    tiny = make_tiny(clients=1, per_client=40)
    model = deep_model()
    params0 = tree.params_of(model)
    own = tiny.test
    algo = SplitLearning(cut_model(model, "1"), cross_entropy, batch_size=8, optimizer=sgd(0.1),
                         pretrain=own, pretrain_epochs=2, seed=4)
    state = algo.init(params0)
    update = local_sgd(model, cross_entropy, epochs=2, batch_size=8, optimizer=sgd(0.1))
    info = ClientInfo("coordinator", 0, derive_seed(4, "split.pretrain"))
    assert_close(state.params, tree.add(params0, update(params0, own, info).update))


def test_splitfed_one_full_batch_step_each_equals_one_sgd_step_on_the_pooled_data():
    """SplitFed oracle with several clients: one full-batch step per client, server step on the
    example-weighted mean loss, client parts averaged by examples = one step of plain SGD on
    all the clients' data together (the mean loss over the pooled examples)."""
    tiny = make_tiny(clients=3, per_client=30)
    model = deep_model()
    params0 = tree.params_of(model)
    algo = SplitLearning(cut_model(model, "1", "3"), cross_entropy, schedule="splitfed",
                         batch_size=25, max_steps=1, optimizer=sgd(0.5), seed=0)
    res = run(algo, transport_for(tiny, algo), params=params0, rounds=1)
    pooled = ArrayData(tiny.x, tiny.y, torch.cat([tiny.data[c].train.index for c in tiny.ids]))
    update = local_sgd(model, cross_entropy, epochs=1, batch_size=75, optimizer=sgd(0.5))
    expected = tree.add(params0, update(params0, pooled, ClientInfo("all", 1, 0)).update)
    assert_close(algo.params(res.state), expected, tol=1e-5)


class WireTransport(InProcessTransport):
    """Every message and reply goes through the network's wire format (shoal.net.wire frames),
    as over gRPC: nothing but tensors, numbers and strings can cross."""

    @staticmethod
    def wire(m: Message) -> Message:
        assembler = Assembler(max_bytes=1 << 30)
        done = None
        for raw in encode_message(m, seq=0, chunk_size=4096):
            frame = decode_frame(raw)
            done = (assembler.header(frame.payload) if frame.type == HEADER
                    else assembler.chunk(frame.payload))
        assert done is not None
        return done[1]

    def deliver(self, message, timeout, answer=None):
        return self.wire(super().deliver(self.wire(message), timeout, answer))


def test_the_conversation_crosses_a_wire_unchanged():
    tiny = make_tiny(clients=2, per_client=30)
    model = deep_model()
    params0 = tree.params_of(model)
    for cuts, schedule in ((("1",), "vanilla"), (("1", "3"), "splitfed")):
        split = cut_model(model, *cuts, input_shape=(8,))
        out = []
        for cls in (InProcessTransport, WireTransport):
            algo = SplitLearning(split, cross_entropy, schedule=schedule, batch_size=8,
                                 optimizer=sgd(0.1), seed=6)
            t = cls(tiny.ids, tiny.data.__getitem__, algo.handlers(), on_error="raise")
            out.append(algo.params(run(algo, t, params=params0, rounds=2).state))
        assert tree.equal(out[0], out[1])
