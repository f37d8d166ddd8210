"""The gRPC transport: parity with simulation, refusals, bad replies, large models."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from shoal import (
    FedAvg,
    InProcessTransport,
    Message,
    Node,
    NodeContext,
    Scaffold,
    cohort,
    local_sgd,
    run,
    tree,
)
from shoal.credentials import CertificateCredentials
from shoal.errors import TransportError
from shoal.net import CertificateAuthority, GrpcTransport, NodeClient
from shoal.net.ca import Identity
from shoal.secagg import SecureFedAvg, secure_aggregation

from ..conftest import cross_entropy, make_tiny, sgd
from ._helpers import coordinator_identity, make_client, node_identity, running


def _algorithm(tiny, secure: bool | str = False, **kw) -> FedAvg:
    update = local_sgd(tiny.model(), cross_entropy, epochs=1, batch_size=8, optimizer=sgd(0.1))
    if secure == "scaffold":  # partial participation: the clients' state matters across rounds
        return Scaffold(update, seed=3, cohort=cohort(2), **kw)
    if secure:
        return SecureFedAvg(update, secagg=secure_aggregation(clip=1.0), seed=3, **kw)
    return FedAvg(update, seed=3, **kw)


def _creds(ca_dir, node_id: str) -> CertificateCredentials:
    """A deployed node signs with its CA-issued key (secure aggregation's signatures)."""
    ident = node_identity(ca_dir, node_id)
    return CertificateCredentials(node_id, ident.key, ident.cert, ident.ca)


def _coordinator(ca_dir, **kw) -> GrpcTransport:
    return GrpcTransport("127.0.0.1:0", identity=coordinator_identity(ca_dir),
                         crl=ca_dir / "ca" / "crl.pem", **kw)


@pytest.mark.parametrize("secure", [False, True, "scaffold"],
                         ids=["fedavg", "secure-aggregation", "scaffold"])
def test_fedavg_over_tls_is_bit_identical_to_simulation(ca_dir, secure: bool | str) -> None:
    tiny = make_tiny()
    params0 = tiny.model().state_dict()
    with _coordinator(ca_dir) as coord:
        # Each client builds its own algorithm object, as `shoal join` does on its machine.
        clients = [make_client(coord.address, Node(NodeContext(cid, tiny.data[cid],
                                                               credentials=_creds(ca_dir, cid)),
                                                   _algorithm(tiny, secure).handlers()), ca_dir)
                   for cid in tiny.ids]
        with running(clients):
            assert coord.wait_for_nodes(len(tiny.ids), 30)
            served = run(_algorithm(tiny, secure), coord, rounds=3, params=params0)
        assert coord.wire_bytes_down > 0 and coord.wire_bytes_up > 0
    sim = InProcessTransport(tiny.ids, tiny.data.__getitem__, _algorithm(tiny, secure).handlers())
    simulated = run(_algorithm(tiny, secure), sim, rounds=3, params=params0)
    for k in params0:
        assert torch.equal(served.state.params[k], simulated.state.params[k]), k
    if secure == "scaffold":  # the control variates too, each c_i kept on its own client
        assert tree.equal(served.state.control, simulated.state.control)
        assert tree.norm(served.state.control) > 0
        assert [h["round/replied"] for h in served.history] == [2.0, 2.0, 2.0]
        return
    assert [h["round/replied"] for h in served.history] == [4.0, 4.0, 4.0]
    if not secure:  # (secure aggregation signs with certificates over gRPC, raw keys in
        # simulation, and its messages' sizes differ with them)
        assert served.history[-1]["comm/bytes_up"] == simulated.history[-1]["comm/bytes_up"]


def _echo(message: Message, context: NodeContext) -> Message:
    return message.reply(tensors={k: v * 2 for k, v in message.tensors.items()})


def _refused(coord: GrpcTransport, client: NodeClient) -> str:
    with pytest.raises(TransportError) as info:
        client.run()
    assert coord.nodes() == []
    return str(info.value)


def test_refusals(ca_dir, tmp_path) -> None:
    other = CertificateAuthority.init(tmp_path / "other")
    other.enroll("client-0", tmp_path / "other-nodes")
    ca = CertificateAuthority(ca_dir / "ca")
    ca.enroll("revoked-node", tmp_path / "rev")
    ca.revoke("revoked-node")
    with _coordinator(ca_dir) as coord:
        def node(nid: str) -> Node:
            return Node(NodeContext(nid), {"echo": _echo})

        # 1. No certificate: the TLS handshake fails; the client gives up after its attempts.
        ident = node_identity(ca_dir, "client-0")
        no_cert = NodeClient(coord.address, node("client-0"), identity=ident, max_attempts=2)
        import grpc
        no_cert._creds = grpc.ssl_channel_credentials(ident.ca.read_bytes())
        msg = _refused(coord, no_cert)
        assert msg.startswith("node 'client-0': could not connect to the coordinator at "
                              f"{coord.address} after 2 attempts (UNAVAILABLE")
        # 2. A certificate from another CA: refused at the handshake too.
        foreign = Identity(tmp_path / "other-nodes" / "client-0.key",
                           tmp_path / "other-nodes" / "client-0.crt", ident.ca)
        msg = _refused(coord, NodeClient(coord.address, node("client-0"), identity=foreign,
                                         max_attempts=2))
        assert "after 2 attempts (UNAVAILABLE" in msg
        # 3. A revoked certificate: the coordinator checks its revocation list.
        revoked = Identity(tmp_path / "rev" / "revoked-node.key",
                           tmp_path / "rev" / "revoked-node.crt", ident.ca)
        msg = _refused(coord, NodeClient(coord.address, node("revoked-node"), identity=revoked))
        assert msg.startswith(f"node 'revoked-node': the coordinator at {coord.address} "
                              "refused it: the certificate of node 'revoked-node' (serial ")
        assert msg.endswith(") is revoked; ask the project's CA to enroll this node again.")
        # 4. Claiming another id than the certificate's.
        msg = _refused(coord, NodeClient(coord.address, node("client-1"), identity=ident))
        assert msg == (f"node 'client-1': the coordinator at {coord.address} refused it: node "
                       "claims id 'client-1' but its certificate is for 'client-0'; a node can "
                       "only join under the id it was enrolled with.")
        # The genuine node still gets in and is answered.
        with running([NodeClient(coord.address, node("client-0"), identity=ident)]):
            assert coord.wait_for_nodes(1, 30)
            (reply,) = coord.request([Message("echo", "coordinator", "client-0", 1,
                                              {"w": torch.ones(3)})], timeout=30)
        assert reply.error is None and torch.equal(reply.tensors["w"], torch.full((3,), 2.0))
        # Revoked while connected: disconnected at its next request, refused when it returns.
        ca.enroll("late-revoked", tmp_path / "late")
        late = Identity(tmp_path / "late" / "late-revoked.key",
                        tmp_path / "late" / "late-revoked.crt", ident.ca)
        client = NodeClient(coord.address, node("late-revoked"), identity=late)
        errors: list[BaseException] = []
        t = threading.Thread(target=lambda: _collect(client, errors), daemon=True)
        t.start()
        deadline = time.monotonic() + 30  # client-0 may still be leaving: wait for this one
        while "late-revoked" not in coord.nodes() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "late-revoked" in coord.nodes()
        ca.revoke("late-revoked")
        (reply,) = coord.request([Message("echo", "coordinator", "late-revoked", 2)], timeout=30)
        assert reply.error == "node 'late-revoked': its certificate was revoked"
        t.join(30)
        assert len(errors) == 1 and "is revoked; ask the project's CA" in str(errors[0])


def _collect(client: NodeClient, errors: list[BaseException]) -> None:
    try:
        client.run()
    except TransportError as e:
        errors.append(e)


def _bad(kind: str, tiny):
    good = _algorithm(tiny).handlers()["train"]

    def handler(message: Message, context: NodeContext) -> Message:
        reply = good(message, context)
        if kind == "shape":
            return reply.with_tensors({**reply.tensors, "0.bias": torch.zeros(3)})
        if kind == "nan":
            t = dict(reply.tensors)
            t["0.weight"] = t["0.weight"].clone()
            t["0.weight"][0, 0] = float("nan")
            return reply.with_tensors(t)
        if kind == "oversized":
            return reply.with_tensors({**reply.tensors, "pad": torch.zeros(1 << 16)})
        if kind == "spoof":
            return Message(reply.kind, "client-0", reply.dst, reply.round, reply.tensors,
                           reply.config, reply.metrics)
        if kind == "old_round":
            return Message(reply.kind, reply.src, reply.dst, message.round - 1, reply.tensors,
                           reply.config, reply.metrics)
        raise AssertionError(kind)
    return handler


def test_bad_replies_are_rejected_and_logged_while_the_round_goes_on(
        ca_dir, caplog: pytest.LogCaptureFixture) -> None:
    tiny = make_tiny(clients=8)
    ca = CertificateAuthority(ca_dir / "ca")
    for i in range(4, 8):
        ca.enroll(f"client-{i}", ca_dir / "nodes")
    bad = {"client-1": "shape", "client-3": "nan", "client-5": "oversized",
           "client-6": "old_round", "client-7": "spoof"}
    caplog.set_level(logging.WARNING)
    with _coordinator(ca_dir, max_message_bytes=64 << 10) as coord:
        clients = []
        for cid in tiny.ids:
            handlers = _algorithm(tiny).handlers()
            if cid in bad:
                handlers["train"] = _bad(bad[cid], tiny)
            clients.append(make_client(coord.address, Node(NodeContext(cid, tiny.data[cid],
                                                                       credentials=_creds(ca_dir,
                                                                                          cid)),
                                                            handlers), ca_dir))
        with running(clients):
            assert coord.wait_for_nodes(8, 30)
            res = run(_algorithm(tiny, min_replies=3, timeout=60), coord, rounds=2,
                      params=tiny.model().state_dict())
    for h in res.history:
        assert h["round/replied"] == 3.0 and h["round/dropped"] == 5.0 and "round/failed" not in h
    text = caplog.text
    assert "dropped client-1: update: '0.bias' has shape (3,), expected (16,)." in text
    assert ("dropped client-3: update: '0.weight' holds 1 non-finite value(s) (NaN or inf); "
            "expected finite numbers.") in text
    assert ("rejected reply from client-5: message of 262924 bytes is over the limit of "
            "65536 bytes (network.max_message_mb); refused unread.") in text
    assert ("rejected reply from client-6: reply is for 'train' round 1, the request was "
            "'train' round 2 (a stale or replayed reply)") in text
    assert ("round 1: rejected reply from client-6: reply is for 'train' round 0, the request "
            "was 'train' round 1") in text

    assert ("round 2: rejected reply from client-7: sender claims to be 'client-0' but the "
            "stream belongs to 'client-7'") in text
    assert sorted({c for c, _ in coord.rejected}) == ["client-5", "client-6", "client-7"]


def test_a_100_mb_model_travels_in_chunks(ca_dir) -> None:
    big = {"w": torch.arange(25 * 2**20, dtype=torch.float32)}  # 100 MiB
    with _coordinator(ca_dir) as coord:
        node = Node(NodeContext("client-0"), {"echo": _echo})
        with running([make_client(coord.address, node, ca_dir)]):
            assert coord.wait_for_nodes(1, 30)
            (reply,) = coord.request([Message("echo", "coordinator", "client-0", 1, big)],
                                     timeout=300)
    assert reply.error is None
    assert torch.equal(reply.tensors["w"], big["w"] * 2)
    assert coord.wire_bytes_down > 100 * 2**20 and coord.wire_bytes_up > 100 * 2**20


def test_insecure_mode_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with GrpcTransport("127.0.0.1:0", insecure=True) as coord:
        node = Node(NodeContext("n1"), {"echo": _echo})
        with running([make_client(coord.address, node, None)]):
            assert coord.wait_for_nodes(1, 30)
            (reply,) = coord.request([Message("echo", "coordinator", "n1", 1,
                                              {"w": torch.ones(2)})], timeout=30)
    assert reply.error is None
    assert "listening WITHOUT TLS" in caplog.text
    with pytest.raises(TransportError, match="mutual TLS needs the coordinator's identity"):
        GrpcTransport("127.0.0.1:0")


def test_timeout_and_disconnect_drop_the_node_not_the_round(ca_dir) -> None:
    release = threading.Event()

    def slow(message: Message, context: NodeContext) -> Message:
        release.wait(20)
        return message.reply()

    with _coordinator(ca_dir) as coord:
        fast = make_client(coord.address, Node(NodeContext("client-0"), {"echo": _echo}), ca_dir)
        late = make_client(coord.address, Node(NodeContext("client-1"), {"echo": slow}), ca_dir)
        with running([fast, late]):
            assert coord.wait_for_nodes(2, 30)
            msgs = [Message("echo", "coordinator", n, 1) for n in ("client-0", "client-1")]
            ok, timed_out = coord.request(msgs, timeout=1.0)
            release.set()
            assert ok.error is None
            assert timed_out.error == "timed out: no reply within 1 s"
            release.clear()
            replies = coord.stream(msgs, timeout=30)
            assert next(replies).error is None
            late.disconnect()
            assert next(replies).error == "node 'client-1' disconnected"
            release.set()
            # The dropped node reconnects (backoff) and answers again.
            late.connected.wait(30)
            assert coord.wait_for_nodes(2, 30)
            assert [r.error for r in coord.request(msgs, timeout=30)] == [None, None]


def test_backoff_grows_exponentially_to_its_cap() -> None:
    from shoal.net import Backoff

    b = Backoff(0.1, 1.0)
    delays = [b.next() for _ in range(8)]
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps, strict=True))
    b.reset()
    assert b.next() <= 0.1


def test_a_peer_speaking_another_wire_version_is_refused(ca_dir) -> None:
    import struct

    import grpc

    from shoal.net import wire
    from shoal.net.coordinator import METHOD

    ident = node_identity(ca_dir, "client-0")
    key, cert, ca = ident.read()
    hello = wire.control(wire.HELLO, {"node_id": "client-0"})
    old = struct.pack(">4sHB", wire.MAGIC, 99, wire.HELLO) + hello[7:]
    with _coordinator(ca_dir) as coord, grpc.secure_channel(
            coord.address, grpc.ssl_channel_credentials(ca, key, cert)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(channel.stream_stream(METHOD)(iter([old]), timeout=30))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == ("wire: the peer speaks shoal wire format version 99, this "
                                    "node speaks version 1; run the same shoal release on the "
                                    "coordinator and the clients.")
