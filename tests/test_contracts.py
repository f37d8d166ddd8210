"""The core contracts the next paradigms stand on: peers, per-link traffic, one place to observe
every message, versioned node state (in simulation and on a deployed client's disk), and
executors that ask a handler what it can do instead of recognising an algorithm."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from shoal import tree
from shoal.algorithms.fedavg import FedAvg
from shoal.client import local_sgd
from shoal.config import load_config
from shoal.errors import TransportError
from shoal.message import COORDINATOR, Message
from shoal.node import (
    Abilities,
    BatchAnswers,
    BatchHandler,
    CapableHandler,
    Node,
    NodeContext,
    NodeState,
    NodeStore,
)
from shoal.observe import Recorder
from shoal.run import run
from shoal.sim import InProcessTransport
from shoal.sim.processes import ProcessesExecutor

from .conftest import cross_entropy, sgd
from .test_executors import assert_close, tiny_model, unequal_federation

# -- peers ----------------------------------------------------------------------------------------


def _ask_neighbour(message: Message, context: NodeContext) -> Message:
    """Node a asks node b for a number and answers with twice it."""
    assert context.peers is not None
    (got,) = context.peers.request([Message("number", context.node_id, "b", message.round)])
    return message.reply(metrics={"twice": 2 * got.metrics["n"]})


def _number(message: Message, context: NodeContext) -> Message:
    return message.reply(metrics={"n": 21.0}, tensors={"pad": torch.zeros(10)})


def test_any_node_addresses_any_node_and_every_link_is_counted():
    t = InProcessTransport(["a", "b"], lambda n: None, {"ask": _ask_neighbour,
                                                        "number": _number})
    seen = t.observe(Recorder())
    (reply,) = t.request([Message("ask", COORDINATOR, "a", 1)])
    assert reply.metrics == {"twice": 42.0}
    links = {k: (v.messages, v.bytes) for k, v in t.stats.links.items()}
    assert set(links) == {(COORDINATOR, "a"), ("a", COORDINATOR), ("a", "b"), ("b", "a")}
    assert links[("b", "a")][1] > 40  # the 10 floats b sent to a
    assert t.stats.messages_peer == 2 and t.stats.messages_down == t.stats.messages_up == 1
    assert [(m.kind, m.src, m.dst) for m in seen] == [
        ("number", "a", "b"), ("number", "b", "a"), ("ask", COORDINATOR, "a"),
        ("ask", "a", COORDINATOR)]
    rows = t.stats.participants()
    assert rows["b"]["bytes_sent"] == links[("b", "a")][1]


def test_a_node_cannot_send_in_another_nodes_name():
    def spoof(message: Message, context: NodeContext) -> Message:
        assert context.peers is not None
        context.peers.request([Message("number", "c", "b", 1)])
        return message.reply()

    t = InProcessTransport(["a", "b"], lambda n: None, {"ask": spoof, "number": _number},
                           on_error="raise")
    with pytest.raises(Exception) as info:
        t.request([Message("ask", COORDINATOR, "a", 1)])
    assert isinstance(info.value.__cause__, TransportError)
    assert str(info.value.__cause__) == "node 'a' cannot send a message as 'c'; set src='a'."


# -- the observer ---------------------------------------------------------------------------------


def _observed_train_updates(executor) -> list[Message]:
    data, ids = unequal_federation()
    model = tiny_model()
    fedavg = FedAvg(local_sgd(model, cross_entropy, batch_size=4, optimizer=sgd(0.1)), seed=5)
    with InProcessTransport(ids, data.__getitem__, fedavg.handlers(),
                            executor=executor) as transport:
        coordinator = transport.observe(Recorder(COORDINATOR, kinds={"train"}))
        run(fedavg, transport, rounds=2, params=tree.params_of(model))
    return coordinator.received


@pytest.mark.parametrize("executor", ["vectorized", "processes"])
def test_the_coordinators_view_is_the_same_whichever_executor_computes(executor):
    want = _observed_train_updates("sequential")
    got = _observed_train_updates(ProcessesExecutor(2) if executor == "processes" else executor)
    key = lambda m: (m.round, m.src)  # noqa: E731
    assert sorted(map(key, want)) == sorted(map(key, got))
    by = {key(m): m for m in got}
    for m in want:  # the updates an honest-but-curious coordinator receives, one by one
        assert_close(m.tensors, by[key(m)].tensors)
        assert m.config["weight"] == by[key(m)].config["weight"]


# -- node state -----------------------------------------------------------------------------------


def test_a_node_sees_the_state_written_before_the_messages_round():
    store = NodeStore()
    v = store.view(1)
    assert dict(v) == {} and not v.changed
    v["c"] = torch.ones(2)
    store.commit(1, v)
    later = store.view(3)
    assert torch.equal(later["c"], torch.ones(2))
    later["c"] = torch.full((2,), 3.0)
    store.commit(3, later)
    assert torch.equal(store.view(3)["c"], torch.ones(2))  # a rerun of round 3 starts over
    assert torch.equal(store.view(4)["c"], torch.full((2,), 3.0))
    again = store.view(2)  # the coordinator resumed from round 1 and runs round 2 again
    again["c"] = torch.zeros(2)
    store.commit(2, again)
    assert sorted(store.versions) == [1, 2]  # round 3's version is stale now: dropped
    for r in range(4, 9):
        s = store.view(r)
        s["c"] = torch.full((2,), float(r))
        store.commit(r, s)
    assert sorted(store.versions) == [6, 7, 8]  # the newest `keep` versions


def test_a_deployed_clients_state_survives_a_restart_of_the_client(tmp_path):
    from shoal.algorithms.scaffold import NODE_CONTROL
    from shoal.net.deploy import node_client

    config = load_config(None, ["federated.algorithm=scaffold", "task.name=digits",
                                "network.insecure=true"])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "site.npz", x=rng.random((20, 64), dtype=np.float32),
             y=rng.integers(0, 10, 20))
    state = tmp_path / "site.state"
    first = node_client(config, "site", tmp_path / "site.npz", state=state)
    from shoal.data.tasks import load_task
    from shoal.experiment import build_federated, make_dataset, resolve_config
    task = load_task("digits")
    resolved = resolve_config(config, task)
    algorithm, _ = build_federated(resolved, task, make_dataset(resolved, task), task.model_fn())
    request = algorithm.train_requests(algorithm.init(tree.params_of(task.model_fn())),
                                       ["site"], 1, [])[0]
    reply = first.node.handle(request)
    assert reply.error is None and state.exists()
    written = first.node.context.store.versions[1][NODE_CONTROL]
    second = node_client(config, "site", tmp_path / "site.npz", state=state)  # a restart
    kept = second.node.context.store.view(2)[NODE_CONTROL]
    assert tree.equal(written, kept)


# -- capabilities, not identities -----------------------------------------------------------------


class _Doubling(BatchHandler):
    """Answers many "double" messages at once (any algorithm may declare such a form)."""

    calls: list[int] = []

    def __call__(self, messages: Sequence[Message],
                 contexts: Sequence[NodeContext]) -> BatchAnswers:
        _Doubling.calls.append(len(messages))
        stack = torch.stack([m.tensors["x"] for m in messages]) * 2
        for c in contexts:
            c.node_state["seen"] = c.node_state.get("seen", 0) + 1
        return BatchAnswers([m.reply(tensors={"x": stack[i]}) for i, m in enumerate(messages)],
                            {i: ({"x": stack}, i) for i in range(len(messages))})


def _double(message: Message, context: NodeContext) -> Message:
    context.node_state["seen"] = context.node_state.get("seen", 0) + 1
    return message.reply(tensors={"x": message.tensors["x"] * 2})


def test_the_vectorized_executor_batches_any_handler_that_declares_a_batched_form(caplog):
    handlers = {"double": CapableHandler(_double, Abilities(batch=_Doubling)), "plain": _double}
    ids = [f"n{i}" for i in range(5)]
    outs = {}
    for name in ("sequential", "vectorized"):
        t = InProcessTransport(ids, lambda n: None, handlers, executor=name)
        with caplog.at_level(logging.WARNING, logger="shoal.sim.executor"):
            for r in (1, 2):
                msgs = [Message(k, COORDINATOR, n, r, {"x": torch.full((3,), float(i))})
                        for i, n in enumerate(ids) for k in ("double", "plain")]
                replies = t.request(msgs)
        outs[name] = ([rep.tensors["x"] for rep in replies],
                      {n: s.view(3)["seen"] for n, s in t.node_states().items()})
    assert _Doubling.calls == [5, 5]  # one batch per round; the executor never asked "FedAvg?"
    assert all(torch.equal(a, b) for a, b in zip(outs["sequential"][0], outs["vectorized"][0],
                                                  strict=True))
    assert outs["sequential"][1] == outs["vectorized"][1] == {n: 2 for n in ids}
    said = [r.getMessage() for r in caplog.records]
    assert said == ["vectorized executor: 'plain' messages run one by one (sequentially): the "
                    "'plain' handler cannot be batched: it declares no batched form"]


def test_a_batched_nodes_state_is_kept_only_if_its_handler_is_reached():
    def drop_n0(message, context, handler):
        return message.failed("dropped") if message.dst == "n0" else handler(message, context)

    handlers = {"double": CapableHandler(_double, Abilities(batch=_Doubling))}
    t = InProcessTransport(["n0", "n1"], lambda n: None, handlers, mods=[drop_n0],
                           executor="vectorized")
    t.request([Message("double", COORDINATOR, n, 1, {"x": torch.ones(1)}) for n in ("n0", "n1")])
    assert set(t.node_states()) == {"n1"}  # n0 was computed in the batch, then dropped


def test_node_state_view_tracks_changes():
    s = NodeState({"a": 1})
    assert not s.changed and s["a"] == 1
    del s["a"]
    assert s.changed and len(s) == 0
    node = Node(NodeContext("x"), {"k": _double})
    node.handle(Message("k", COORDINATOR, "x", 4, {"x": torch.ones(1)}))
    assert node.context.store.versions == {4: {"seen": 1}}
