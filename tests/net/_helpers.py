"""Helpers for the deployment tests: start client nodes in threads and stop them."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from shoal.net import Identity, NodeClient
from shoal.node import Node


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
