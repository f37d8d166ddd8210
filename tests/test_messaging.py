"""Messages, nodes with middleware, and the in-process transport."""

from __future__ import annotations

import json
import time

import pytest
import torch

from shoal.errors import ClientError
from shoal.message import Message
from shoal.node import Node, NodeContext
from shoal.sim import InProcessTransport


def _echo(m: Message, ctx: NodeContext) -> Message:
    return m.reply(metrics={"seen": float(len(ctx.state))})


def test_reply_swaps_ends_and_keeps_kind_and_round():
    m = Message("train", "coordinator", "c1", 4, {"w": torch.zeros(3)}, {"a": 1})
    r = m.reply(metrics={"x": 1.0})
    assert (r.kind, r.src, r.dst, r.round, r.error) == ("train", "c1", "coordinator", 4, None)
    assert m.failed("boom").error == "boom"


def test_nbytes_counts_tensor_data_and_header():
    m = Message("train", "a", "b", 1, {"w": torch.zeros(1000)})
    assert 4000 < m.nbytes() < 4200


@pytest.mark.parametrize("m", [
    Message("train", "coordinator", "client-\u00e9", 3,
            {"1.weight": torch.zeros(4, 5), "b\"q": torch.zeros(2, dtype=torch.float64)},
            {"stages": [{"clip": 1.5}], "weight": 7}, {"train/loss": 0.25}, None),
    Message("evaluate", "c", "coordinator", 0, error="timed out: \"x\""),
], ids=["tensors", "error-only"])
def test_nbytes_is_the_data_plus_the_compact_json_header(m):
    header = json.dumps(m.header(), separators=(",", ":"))
    assert m.nbytes() == sum(v.numel() * v.element_size() for v in m.tensors.values()) \
        + len(header)


def test_unknown_kind_gets_an_error_reply_naming_the_known_kinds():
    node = Node(NodeContext("c1"), {"train": _echo, "evaluate": _echo})
    r = node.handle(Message("split.forward", "coordinator", "c1", 1))
    assert r.error == ("node 'c1' has no handler for message kind 'split.forward'; "
                       "it handles evaluate, train.")


def test_mods_wrap_handlers_outermost_first():
    order = []

    def mod(name):
        def m(msg, ctx, nxt):
            order.append(f"{name}>")
            rep = nxt(msg, ctx)
            order.append(f"<{name}")
            return rep
        return m

    node = Node(NodeContext("c"), {"k": _echo}, [mod("a"), mod("b")])
    node.handle(Message("k", "s", "c", 1))
    assert order == ["a>", "b>", "<b", "<a"]


def test_inprocess_unknown_node_and_persistent_state():
    def stateful(m, ctx):
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return m.reply(metrics={"n": float(ctx.state["n"])})

    t = InProcessTransport(["a"], lambda cid: None, {"k": stateful})
    r1, r2 = t.request([Message("k", "s", "a", 1), Message("k", "s", "zz", 1)])
    assert r1.metrics == {"n": 1.0}
    assert r2.error == "unknown node 'zz': no simulated node has this id."
    (r3,) = t.request([Message("k", "s", "a", 2)])
    assert r3.metrics == {"n": 2.0}
    assert t.stats.links[("s", "a")].messages == 2  # counted per link: "s" sent them
    assert t.stats.links[("a", "s")].messages == 2 and t.stats.messages_peer == 6


def test_inprocess_raise_mode_names_client_and_round():
    def broken(m, ctx):
        raise ValueError("bad data")

    t = InProcessTransport(["a"], lambda cid: None, {"k": broken}, on_error="raise")
    with pytest.raises(ClientError) as e:
        t.request([Message("k", "s", "a", 9)])
    assert str(e.value) == "node 'a' failed handling 'k' in round 9: ValueError: bad data"
    assert e.value.client == "a" and e.value.round == 9
    assert isinstance(e.value.__cause__, ValueError)


def test_inprocess_drop_mode_and_timeout():
    def slow(m, ctx):
        time.sleep(0.05)
        return m.reply()

    t = InProcessTransport(["a"], lambda cid: None, {"k": slow})
    (r,) = t.request([Message("k", "s", "a", 1)], timeout=0.01)
    assert r.error.startswith("timed out: answered after ") and r.error.endswith(
        "s, the limit is 0.01 s")
