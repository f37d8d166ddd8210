"""Stragglers and short rounds in deployment (issue 19): one stalled client cannot hold a round
for the whole timeout (late_grace_s); a round short of replies is retried, except under DP."""

from __future__ import annotations

import threading

import torch

from shoal.message import Message
from shoal.net import GrpcTransport
from shoal.node import Node, NodeContext

from ._helpers import make_client, running


def _ask(answer, ids: tuple[str, ...], grace: float, timeout: float,
         then=lambda: None) -> list[Message]:
    """One batch of "echo" requests to nodes ``ids`` answering with ``answer``, over gRPC,
    with a quorum of 2 and late grace ``grace``; ``then()`` runs once the replies are in."""
    coord = GrpcTransport("127.0.0.1:0", insecure=True)
    coord.quorum, coord.late_grace_s = 2, grace
    try:
        nodes = [Node(NodeContext(cid), {"echo": answer}) for cid in ids]
        with running([make_client(coord.address, n, None) for n in nodes]):
            assert coord.wait_for_nodes(len(ids), 30)
            replies = coord.request([Message("echo", "coordinator", cid, 1) for cid in ids],
                                    timeout=timeout)
            then()
            return replies
    finally:
        coord.close()


def test_a_straggler_gets_late_grace_after_the_quorum_answered() -> None:
    release = threading.Event()

    def answer(message: Message, context: NodeContext) -> Message:
        if context.node_id == "slow":
            release.wait(60)  # stalls until the test ends
        return message.reply(tensors={"w": torch.ones(1)})

    replies = _ask(answer, ("slow", "a", "b"), grace=0.5, timeout=120, then=release.set)
    assert replies[0].error is not None and "late_grace_s" in replies[0].error
    assert replies[1].error is None and replies[2].error is None


def test_without_a_quorum_every_reply_is_awaited() -> None:
    """Fewer valid replies than the quorum: no grace starts, the batch waits for all."""
    def answer(message: Message, context: NodeContext) -> Message:
        if context.node_id == "a":
            return message.failed("no data")
        return message.reply(tensors={"w": torch.ones(1)})

    replies = _ask(answer, ("a", "b", "c"), grace=0.01, timeout=60)
    assert [r.error for r in replies] == ["no data", None, None]


def test_round_retries_apply_only_without_differential_privacy(caplog) -> None:
    from shoal.config import load_config
    from shoal.net.deploy import round_retries

    assert round_retries(load_config(None, ["network.round_retries=3"])) == 3
    dp = load_config(None, ["network.round_retries=3", "privacy.mode=user",
                            "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"])
    with caplog.at_level("WARNING"):
        assert round_retries(dp) == 0
    assert "network.round_retries = 3 is not applied" in caplog.text
