"""The coordinator under attack from loopback: idle and half-open connections, streams that
never say HELLO, floods of unsolicited replies, hostile JSON, a broken or missing revocation
list, and how private keys are written. Real gRPC and real TLS throughout."""

from __future__ import annotations

import logging
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shoal import Message, Node, NodeContext
from shoal.errors import ConfigError, TransportError
from shoal.net import CertificateAuthority, GrpcTransport, Identity, NodeClient, wire
from shoal.net.coordinator import METHOD, REJECTED_KEPT

from ._helpers import coordinator_identity, node_identity, running

LOG = "shoal.net.coordinator"


def _coordinator(ca_dir: Path, **kw) -> GrpcTransport:
    return GrpcTransport("127.0.0.1:0", identity=coordinator_identity(ca_dir),
                         crl=ca_dir / "ca" / "crl.pem", **kw)


def _echo(message: Message, context: NodeContext) -> Message:
    return message.reply(tensors={k: v * 2 for k, v in message.tensors.items()})


def _assert_served(coord: GrpcTransport, ident: Identity, node_id: str = "client-0") -> None:
    """A genuine enrolled client connects and gets a request answered."""
    client = NodeClient(coord.address, Node(NodeContext(node_id), {"echo": _echo}),
                        identity=ident)
    with running([client]):
        deadline = time.monotonic() + 20
        while node_id not in coord.nodes() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node_id in coord.nodes()
        (reply,) = coord.request([Message("echo", "coordinator", node_id, 1,
                                          {"w": torch.ones(2)})], timeout=20)
    assert reply.error is None and torch.equal(reply.tensors["w"], torch.full((2,), 2.0))


def _wait_closed(socks: list[socket.socket], count: int, within: float) -> int:
    """Wait until ``count`` of ``socks`` were closed by the server (or ``within`` seconds
    passed); how many were."""
    closed: set[socket.socket] = set()
    deadline = time.monotonic() + within
    while len(closed) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.1)
        for s in ready:
            try:
                data = s.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                closed.add(s)
    return len(closed)


def _raw_call(address: str, ident: Identity, frames: list[bytes], stop: threading.Event,
              timeout: float = 30) -> tuple[grpc.Channel, object]:
    """A stream of our own on its own connection: ``frames``, then silence until ``stop``."""
    key, cert, ca = ident.read()
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert),
                                  options=[("grpc.use_local_subchannel_pool", 1)])

    def requests() -> Iterator[bytes]:
        yield from frames
        stop.wait()

    return channel, channel.stream_stream(METHOD)(requests(), timeout=timeout)


# 1. Idle TCP connections and truncated ClientHellos -------------------------------------------

def test_the_file_limit_is_raised_and_connections_are_sized_below_it(ca_dir) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip(f"needs a finite hard limit on open files of at least 512 (it is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
    try:
        with _coordinator(ca_dir) as coord:
            now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            assert now == hard
            assert 16 <= coord.max_connections <= hard - 64
        with pytest.raises(TransportError, match=r"max_connections=\d+ leaves fewer than 64 "
                                                 r"of the \d+ files this process may open"):
            _coordinator(ca_dir, max_connections=hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_over_the_limit_are_closed_and_a_client_still_gets_in(ca_dir) -> None:
    with _coordinator(ca_dir, max_connections=8, handshake_timeout=60) as coord:
        socks = [socket.create_connection(("127.0.0.1", coord.port)) for _ in range(24)]
        try:
            # 16 over the limit are closed on arrival; 8 wait in their (long) handshake.
            assert _wait_closed(socks, 16, within=10) == 16
            assert _wait_closed(socks, 17, within=0.5) == 16
            with open(os.devnull, "rb"):  # the coordinator still opens files
                pass
        finally:
            for s in socks:
                s.close()
        _assert_served(coord, node_identity(ca_dir, "client-0"))


def test_idle_and_half_open_connections_are_closed_at_the_handshake_deadline(ca_dir) -> None:
    with _coordinator(ca_dir, max_connections=64, handshake_timeout=1.0) as coord:
        socks = [socket.create_connection(("127.0.0.1", coord.port)) for _ in range(10)]
        # A truncated ClientHello: a TLS handshake record header and the first body bytes.
        socks[0].sendall(bytes.fromhex("16030102000100011c0303"))
        try:
            assert _wait_closed(socks, len(socks), within=15) == len(socks)
        finally:
            for s in socks:
                s.close()
        with open(ca_dir / "ca" / "crl.pem", "rb"):
            pass
        _assert_served(coord, node_identity(ca_dir, "client-0"))


# 2. Streams that never say HELLO ---------------------------------------------------------------

def test_one_node_cannot_starve_the_others_with_streams_that_never_say_hello(ca_dir) -> None:
    stop = threading.Event()
    calls = []
    with _coordinator(ca_dir, max_workers=16, hello_timeout=3.0) as coord:
        try:
            for _ in range(20):  # more than the 16 threads could serve
                calls.append(_raw_call(coord.address, node_identity(ca_dir, "client-1"), [],
                                       stop))
            _assert_served(coord, node_identity(ca_dir, "client-0"))
            ended = [(call.code(), call.details()) for _, call in calls]  # type: ignore[attr-defined]
        finally:
            stop.set()
            for channel, _ in calls:
                channel.close()
    refused = [d for c, d in ended if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    no_hello = [d for c, d in ended if c == grpc.StatusCode.DEADLINE_EXCEEDED]
    assert len(refused) + len(no_hello) == 20, ended
    assert 1 <= len(no_hello) and len(refused) >= 16, ended
    assert set(no_hello) == {"no HELLO frame within 3 s of opening the stream (the "
                             "coordinator's hello_timeout); a client sends HELLO {node_id} as "
                             "the first frame of its stream."}
    per_node = ("node 'client-1' already holds 2 streams to the coordinator, the most one node "
                "may hold at once (max_streams_per_node=2); close the others, or wait for them "
                "to time out, before opening another.")
    # Streams that arrive while the server's total is reached are refused by gRPC itself
    # (its maximum_concurrent_rpcs) before our handler sees them: a refusal all the same; how
    # many depends on timing.
    assert per_node in set(refused), ended
    assert set(refused) <= {per_node, "Concurrent RPC limit exceeded!"}, ended


def test_the_total_stream_limit_refuses_with_a_reason(ca_dir) -> None:
    stop = threading.Event()
    calls = []
    with _coordinator(ca_dir, max_streams=2, hello_timeout=5.0) as coord:
        try:
            for cid in ("client-1", "client-2"):
                calls.append(_raw_call(coord.address, node_identity(ca_dir, cid),
                                       [wire.control(wire.HELLO, {"node_id": cid})], stop))
            assert coord.wait_for_nodes(2, 20)
            channel, call = _raw_call(coord.address, node_identity(ca_dir, "client-3"),
                                      [wire.control(wire.HELLO, {"node_id": "client-3"})], stop)
            calls.append((channel, call))
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert call.details() == ("the coordinator serves 2 streams, its limit "  # type: ignore[attr-defined]
                                      "(max_streams=2); try again later.")
        finally:
            stop.set()
            for channel, _ in calls:
                channel.close()


# 3. Floods of unsolicited replies -------------------------------------------------------------

def test_a_flood_of_unsolicited_replies_closes_the_stream_and_the_log_stays_short(
        ca_dir, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOG)
    stop = threading.Event()
    flood = [wire.control(wire.HELLO, {"node_id": "client-1"})]
    for i in range(2000):
        flood += wire.encode_message(Message("echo", "client-1", "coordinator", 1,
                                             {"w": torch.ones(1)}), 10_000 + i)
    with _coordinator(ca_dir, max_rejections=20, max_warnings_per_node=5) as coord:
        channel, call = _raw_call(coord.address, node_identity(ca_dir, "client-1"), flood,
                                  stop, timeout=20)
        try:
            frames = []
            with pytest.raises(grpc.RpcError) as info:
                for data in call:  # type: ignore[attr-defined]
                    frames.append(wire.decode_frame(data).type)
            assert frames == [wire.WELCOME]
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details().startswith(
                "the coordinator closed the stream of node 'client-1': more than 20 of its "
                "replies were rejected within 60 s (max_rejections; the last: 'echo' round 1 "
                "(seq ")
            _assert_served(coord, node_identity(ca_dir, "client-0"))
        finally:
            stop.set()
            channel.close()
        assert 20 < coord.rejections["client-1"] < 2000
        assert coord.rejected.maxlen == REJECTED_KEPT
    about = [r.getMessage() for r in caplog.records if "client-1" in r.getMessage()]
    assert len(about) <= 10, about
    assert sum("rejected reply from client-1" in m for m in about) == 5
    assert any("more warning(s) about it were suppressed" in m for m in about), about


# 4. Deeply nested JSON -------------------------------------------------------------------------

def test_deeply_nested_json_is_refused_before_parsing(ca_dir,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    deep = wire.control(wire.HELLO, {})[:7] + b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(TransportError, match=r"^wire: HELLO frame nests JSON 100000 levels "
                                             r"deep, over the limit of 64 levels"):
        wire.decode_frame(deep)
    # Brackets inside strings do not count; shoal's own depth passes.
    ok = wire.control(wire.HEADER, {"node_id": "[" * 1000, "a": [[[[1]]]]})
    assert wire.decode_frame(ok).payload["a"] == [[[[1]]]]
    assert wire.json_depth(b'{"a": "]]]{{{", "b": [{"c": []}]}') == 4
    caplog.set_level(logging.WARNING)
    stop = threading.Event()
    with _coordinator(ca_dir) as coord:
        channel, call = _raw_call(coord.address, node_identity(ca_dir, "client-1"), [deep],
                                  stop)
        try:
            assert call.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
            assert "over the limit of 64 levels" in call.details()  # type: ignore[attr-defined]
        finally:
            stop.set()
            channel.close()
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text


# 5. Revocation ---------------------------------------------------------------------------------

def test_a_truncated_crl_keeps_the_last_good_list(tmp_path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.enroll("client-0", tmp_path / "nodes")
    revoked = ca.enroll("revoked-node", tmp_path / "nodes")
    ca.revoke("revoked-node")
    crl = tmp_path / "copy" / "crl.pem"
    crl.parent.mkdir()
    shutil.copy(tmp_path / "ca" / "crl.pem", crl)
    caplog.set_level(logging.WARNING)
    with GrpcTransport("127.0.0.1:0", identity=coordinator_identity(tmp_path), crl=crl) as coord:
        good = crl.read_bytes()
        for broken in (good[: len(good) // 2], b"not a CRL at all"):
            crl.write_bytes(broken)  # a non-atomic copy, caught half way
            client = NodeClient(coord.address, Node(NodeContext("revoked-node"), {}),
                                identity=revoked, max_attempts=3)
            with pytest.raises(TransportError, match=r"\) is revoked; ask the project's CA"):
                client.run()
            _assert_served(coord, node_identity(tmp_path, "client-0"))
    assert "keeping the last good list (1 revoked serial(s)) in force" in caplog.text
    assert "is not a valid PEM revocation list" in caplog.text


def test_a_missing_crl_refuses_to_start_unless_revocation_is_turned_off(
        ca_dir, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "crl.pem"
    with pytest.raises(TransportError) as info:
        GrpcTransport("127.0.0.1:0", identity=coordinator_identity(ca_dir), crl=missing)
    assert str(info.value) == (
        f"TLS: the revocation list {str(missing)!r} does not exist, so revoked certificates "
        "could not be refused; copy crl.pem from the project's CA directory (`shoal ca init` "
        "writes it, `shoal ca revoke` updates it) to that path, or pass crl=None to run "
        "without revocation checks.")
    missing.write_bytes(b"-----BEGIN X509 CRL-----\ntruncated")
    with pytest.raises(TransportError, match="is not a valid PEM revocation list"):
        GrpcTransport("127.0.0.1:0", identity=coordinator_identity(ca_dir), crl=missing)
    caplog.set_level(logging.WARNING)
    with GrpcTransport("127.0.0.1:0", identity=coordinator_identity(ca_dir), crl=None):
        pass
    assert "revocation checks are OFF (crl=None)" in caplog.text


# 6. Private keys -------------------------------------------------------------------------------

_WATCH_KEYS = r"""
import os, sys
from pathlib import Path
root = Path(sys.argv[1])
bad = []
def hook(event, args):
    if event in ("open", "os.chmod", "os.rename", "os.replace") and root.exists():
        for p in root.rglob("*"):
            if ".key" in p.name and p.is_file():
                mode = p.stat().st_mode & 0o777
                if mode != 0o600:
                    bad.append(f"{p.name} was {oct(mode)} at {event}")
sys.addaudithook(hook)
os.umask(0o022)
from shoal.net.ca import CertificateAuthority
ca = CertificateAuthority.init(root / "ca")
ca.enroll("client-0", root / "nodes")
ca.enroll("client-0", root / "nodes")  # enrolled again: the key is replaced
print("BAD", bad)
"""


def test_private_keys_are_never_readable_by_others(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-c", _WATCH_KEYS, str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "BAD []"
    keys = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.key*"))
    assert keys == ["ca/ca.key", "ca/coordinator.key", "nodes/client-0.key"]
    for k in keys:
        assert (tmp_path / k).stat().st_mode & 0o777 == 0o600


def test_an_encrypted_key_round_trips_and_a_wrong_passphrase_is_a_clear_error(
        tmp_path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", passphrase=b"ca secret")
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "ca" / "ca.key").read_bytes()
    key_path = str(tmp_path / "ca" / "ca.key")
    with pytest.raises(ConfigError) as info:
        CertificateAuthority(tmp_path / "ca")
    assert str(info.value) == (f"TLS: the private key {key_path!r} is encrypted and no "
                               "passphrase was given; pass the passphrase it was written "
                               "with (passphrase=b'...').")
    with pytest.raises(ConfigError) as info:
        CertificateAuthority(tmp_path / "ca", passphrase=b"guess")
    assert str(info.value) == (f"TLS: cannot decrypt the private key {key_path!r}: the "
                               "passphrase is wrong; pass the passphrase it was written with.")
    ca = CertificateAuthority(tmp_path / "ca", passphrase=b"ca secret")
    ident = ca.enroll("client-0", tmp_path / "nodes", passphrase=b"node secret")
    assert b"ENCRYPTED PRIVATE KEY" in ident.key.read_bytes()
    assert "node secret" not in repr(ident)
    plain = Identity(ident.key, ident.cert, ident.ca)
    with pytest.raises(ConfigError, match="is encrypted and no passphrase was given"):
        plain.read()
    with pytest.raises(ConfigError, match="the passphrase is wrong"):
        plain.read(b"guess")
    key, cert, _ = plain.read(b"node secret")
    assert key == ident.read()[0]
    loaded = serialization.load_pem_private_key(key, None)
    assert loaded.public_key() == x509.load_pem_x509_certificate(cert).public_key()
    # The encrypted identity joins over real mutual TLS.
    with GrpcTransport("127.0.0.1:0", identity=coordinator_identity(tmp_path),
                       crl=tmp_path / "ca" / "crl.pem") as coord:
        _assert_served(coord, ident)



def test_cli_encrypts_keys_with_passphrase_files_and_deploy_reads_them(tmp_path) -> None:
    """`shoal ca init/enroll` with passphrase files write encrypted keys; the CA key is needed
    to enroll; a node reads its key with network.key_passphrase_file."""
    from typer.testing import CliRunner

    from shoal.cli import app
    from shoal.config import load_config
    from shoal.errors import ConfigError
    from shoal.net.deploy import _identity

    ca_secret, node_secret = tmp_path / "ca.pass", tmp_path / "node.pass"
    ca_secret.write_text("correct horse\n")
    node_secret.write_text("battery staple\n")
    ca, out = tmp_path / "ca", tmp_path / "node"
    runner = CliRunner()
    res = runner.invoke(app, ["ca", "init", "--dir", str(ca), "--passphrase-file", str(ca_secret)])
    assert res.exit_code == 0, res.output
    assert (ca / "ca.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
    res = runner.invoke(app, ["ca", "enroll", "n1", "--dir", str(ca), "--out", str(out)])
    assert res.exit_code != 0 and "is encrypted and no passphrase was given" in str(res.exception)
    res = runner.invoke(app, ["ca", "enroll", "n1", "--dir", str(ca), "--out", str(out),
                              "--passphrase-file", str(ca_secret),
                              "--key-passphrase-file", str(node_secret)])
    assert res.exit_code == 0, res.output
    assert (out / "n1.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
    config = load_config(None, [f'network.tls_dir="{out}"',
                                f'network.key_passphrase_file="{node_secret}"'])
    ident = _identity(config.network, "n1")
    assert ident is not None and ident.read()[0].startswith(b"-----BEGIN PRIVATE KEY")
    missing = load_config(None, [f'network.tls_dir="{out}"',
                                 f'network.key_passphrase_file="{tmp_path / "nope"}"'])
    with pytest.raises(ConfigError, match="network.key_passphrase_file.*cannot read"):
        _identity(missing.network, "n1")
