"""Helpers for the deployment tests: start client nodes in threads and stop them."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from shoal.net import Identity, NodeClient
from shoal.node import Node

JOB = """
seed = 2
[task]
name = "digits"
hidden = 16
[data]
partition = "iid"
num_clients = 3
[federated]
rounds = {rounds}
clients_per_round = 3
timeout_s = 60
[client]
epochs = 1
max_steps = 3
[network]
address = "127.0.0.1:{port}"
tls_dir = "{tls}"
min_nodes = 3
wait_s = 120
reconnect_max_s = 0.5
"""
"""A small deployed job of three clients: format with ``rounds``, ``port`` and ``tls``."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_identity(root: Path, node_id: str) -> Identity:
    return Identity(root / "nodes" / f"{node_id}.key", root / "nodes" / f"{node_id}.crt",
                    root / "nodes" / "ca.crt")


def coordinator_identity(root: Path) -> Identity:
    ca = root / "ca"
    return Identity(ca / "coordinator.key", ca / "coordinator.crt", ca / "ca.crt")


@contextmanager
def running(clients: Sequence[NodeClient]) -> Iterator[list[NodeClient]]:
    """Run each client in a daemon thread; stop them all afterwards."""
    errors: list[BaseException] = []

    def target(c: NodeClient) -> None:
        try:
            c.run()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    threads = [threading.Thread(target=target, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    try:
        yield list(clients)
    finally:
        for c in clients:
            c.stop()
        for t in threads:
            t.join(10)


def make_client(address: str, node: Node, root: Path | None, **kw) -> NodeClient:
    ident = None if root is None else node_identity(root, node.node_id)
    return NodeClient(address, node, identity=ident, insecure=root is None, **kw)
