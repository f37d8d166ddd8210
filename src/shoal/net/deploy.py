"""``serve`` and ``join``: the algorithm ``shoal run`` simulates, run over the network.

Both sides build the algorithm with the same builder as the simulation
(:func:`shoal.experiment.build_federated`) from the same config, so what was measured in
simulation is what runs: the coordinator runs :func:`shoal.experiment.run_experiment` with the
simulated transport replaced by a :class:`GrpcTransport` (same callbacks, metrics, checkpoints
after every round, ``resume``), and each client runs a :class:`NodeClient` whose node answers
with the algorithm's handlers on the client's own data file.

What the coordinator tells the clients is true: BYE ("the run is finished") only when the run
is over (all rounds, or a deliberate stop such as a privacy budget); when it stops before (an
exception, Ctrl-C, SIGTERM) it sends RESTART instead, its last checkpoint stays, and the clients
keep reconnecting (up to ``network.patience_s``) for ``shoal serve --resume``. A round never
starts with fewer connected clients than it needs (:class:`WaitForNodes`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from pathlib import Path
from typing import Any

from ..checkpoint import load_node_store, save_node_store
from ..config import Config, NetworkConfig
from ..credentials import CertificateCredentials
from ..data.tasks import load_task
from ..errors import ConfigError
from ..experiment import (
    Built,
    ParadigmResult,
    build_federated,
    initial_params,
    make_dataset,
    resolve_config,
    run_experiment,
)
from ..node import Node, NodeContext, NodeStore
from .ca import Identity, read_passphrase
from .client import Backoff, NodeClient
from .clientdata import load_client_data
from .coordinator import GrpcTransport

__all__ = ["WaitForNodes", "coordinator_config", "coordinator_transport", "join", "node_client",
           "refuse_simulation_only", "round_retries", "serve"]

log = logging.getLogger(__name__)


def _identity(net: NetworkConfig, node_id: str) -> Identity | None:
    if net.insecure:
        return None
    d = Path(net.tls_dir)
    secret = (read_passphrase(net.key_passphrase_file, "config field 'network.key_passphrase_file'")
              if net.key_passphrase_file else None)
    return Identity(d / f"{node_id}.key", d / f"{node_id}.crt", d / "ca.crt", secret)


class WaitForNodes:
    """A callback: before each round, wait for clients to connect.

    First up to ``wait_s`` seconds for ``count`` clients (``network.min_nodes`` /
    ``network.wait_s``; a round started with fewer samples from fewer clients). After that the
    round starts if at least ``least`` clients are connected, the fewest valid replies it needs
    (the algorithm's ``min_replies``, at least 1); with fewer it keeps waiting, however long it
    takes, logging every ``poll_s`` seconds: a round that would start without the clients it
    needs would fail, and a resumed coordinator would otherwise run its remaining rounds with
    nobody. Ctrl-C (or SIGTERM) stops the wait; ``shoal serve --resume`` continues.
    """

    def __init__(self, transport: GrpcTransport, count: int, wait_s: float, least: int = 1,
                 poll_s: float = 60.0):
        self.transport = transport
        self.count = count
        self.wait_s = wait_s
        self.least = max(1, least)
        self.poll_s = poll_s

    def before_round(self, ctx: Any, round: int) -> None:
        """Block until ``count`` clients are connected, or ``wait_s`` passed and at least
        ``least`` are."""
        want = max(self.count, self.least)
        have = len(self.transport.nodes())
        if have < want:
            log.info("round %d: waiting up to %g s for %d connected clients (%d now)", round,
                     self.wait_s, want, have)
        if self.transport.wait_for_nodes(want, self.wait_s):
            return
        have = len(self.transport.nodes())
        if have >= self.least:
            log.warning("round %d starts with %d connected clients; waited %g s for %d "
                        "(network.min_nodes)", round, have, self.wait_s, want)
            return
        log.warning("round %d needs at least %d connected clients and %d are connected after "
                    "%g s (network.wait_s); waiting until they connect (Ctrl-C stops; "
                    "`shoal serve --resume` continues)", round, self.least, have, self.wait_s)
        while not self.transport.wait_for_nodes(self.least, self.poll_s):
            log.warning("round %d: still waiting for %d connected clients (%d now)", round,
                        self.least, len(self.transport.nodes()))


def coordinator_transport(config: Config, address: str | None = None) -> GrpcTransport:
    """The coordinator's gRPC transport as ``[network]`` describes it (TLS files in
    ``tls_dir``: ``coordinator.key``, ``coordinator.crt``, ``ca.crt``, ``crl.pem``)."""
    net = config.network
    ident = _identity(net, "coordinator")
    return GrpcTransport(address or net.address, identity=ident, insecure=net.insecure,
                         crl=None if net.insecure else Path(net.tls_dir) / "crl.pem",
                         max_message_bytes=int(net.max_message_mb * 2**20),
                         chunk_size=net.chunk_kb * 1024,
                         max_workers=max(256, 2 * net.min_nodes + 32))


def coordinator_config(config: Config) -> Config:
    """What the coordinator runs of ``config``: a federated job (another paradigm raises a
    ConfigError), no centralized baseline; and never ``privacy.reproducible`` (noise drawn
    from the seed every participant holds could be regenerated and subtracted): a deployed run
    refuses it."""
    if config.paradigm != "federated":
        raise ConfigError(f"serve: paradigm is {config.paradigm!r}; the coordinator runs "
                          "federated jobs (paradigm = \"federated\").")
    refuse_simulation_only(config, "serve")
    return dataclasses.replace(config, baseline=False)


def refuse_simulation_only(config: Config, command: str) -> None:
    """Raise a ConfigError for a deployed run with a setting only a simulation may have:
    ``privacy.reproducible = true`` (noise anyone could regenerate), an ``[attack]`` (the
    simulated malicious participants would be real ones) or ``audit.canaries`` (planted by the
    simulation into data that, deployed, each client holds itself)."""
    if config.audit.canaries:
        raise ConfigError(
            f"config field 'audit.canaries': {command} runs a deployment, where each client "
            "holds its own data, but audit.canaries = "
            f"{config.audit.canaries} plants canaries into the clients' data, which only a "
            "simulation can; set audit.canaries = 0 (the one-run audit is for `shoal run`).")
    if config.attack.kind != "none":
        raise ConfigError(
            f"config field 'attack.kind': {command} runs a deployment, but attack.kind = "
            f"\"{config.attack.kind}\" simulates malicious participants, which would make this "
            "node one; set attack.kind = \"none\" (attacks are for `shoal run`).")
    if config.privacy.mode != "off" and config.privacy.reproducible:
        raise ConfigError(
            f"config field 'privacy.reproducible': {command} runs a deployment, whose DP noise "
            "must stay secret from the coordinator and the other participants, but "
            "reproducible = true draws it from the run's seed, which every participant holds; "
            "set privacy.reproducible = false.")


def serve(config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          transport: GrpcTransport | None = None, callbacks: Any = None,
          ) -> list[ParadigmResult]:
    """Run ``config``'s federated job as the coordinator; clients connect with :func:`join`.

    Writes the same run directory as ``shoal run`` (checkpoint after every round by default);
    ``resume=True`` continues from the newest checkpoint. The centralized baseline is not run.

    The transport (``transport``, or one built from ``config.network``) is closed at the end:
    with BYE when the run is over (the clients exit), with RESTART when it stopped before, by
    an exception or KeyboardInterrupt, which is then re-raised (the clients wait for
    ``serve(..., resume=True)``). ``callbacks(paradigm, rounds)`` adds callbacks, as in
    :func:`run_experiment`.
    """
    config = coordinator_config(config)
    grpc_transport = transport or coordinator_transport(config)
    log.info("coordinator listening on %s", grpc_transport.address)
    net = config.network
    least: dict[str, int] = {}

    def factory(paradigm: str, rounds: int) -> list[Any]:
        extra = list(callbacks(paradigm, rounds)) if callbacks else []
        return [WaitForNodes(grpc_transport, net.min_nodes, net.wait_s,
                             least=least.get(paradigm, 1)), *extra]

    def swap(paradigm: str, built: Built) -> GrpcTransport:
        least[paradigm] = int(getattr(built.algorithm, "min_replies", 1) or 1)
        # Once the round has its min_replies, a straggler gets late_grace_s more.
        grpc_transport.quorum = least[paradigm]
        grpc_transport.late_grace_s = net.late_grace_s or None
        return grpc_transport

    try:
        results = run_experiment(config, run_dir, resume=resume, overwrite=overwrite,
                                 callbacks=factory,
                                 transport=swap, round_retries=round_retries(config))
    except BaseException as e:
        why = ("interrupted: Ctrl-C or SIGTERM" if isinstance(e, KeyboardInterrupt)
               else f"it failed: {type(e).__name__}")
        log.warning("the run stopped before it was over (%s); telling the clients to wait for "
                    "`shoal serve --resume`", why)
        grpc_transport.close(f"the coordinator stopped before the run was over ({why}); its "
                             "last checkpoint is kept, and `shoal serve --resume` continues "
                             "the run", restart=True)
        raise
    early = "; ".join(f"{r.paradigm} stopped early: {r.stopped}" for r in results if r.stopped)
    grpc_transport.close("the run is finished" + (f" ({early})" if early else ""))
    return results


def round_retries(config: Config) -> int:
    """``network.round_retries``, or 0 under differential privacy (said in the log): every
    attempt of a round releases the clients' updates, and the accountant counts rounds."""
    retries = config.network.round_retries
    if retries and config.privacy.mode != "off":
        log.warning("network.round_retries = %d is not applied: with privacy.mode = %r every "
                    "attempt of a round releases updates that the accountant, which counts "
                    "rounds, would not count; a round short of replies fails instead",
                    retries, config.privacy.mode)
        return 0
    return retries


def node_client(config: Config, node_id: str, data: str | Path, *,
                address: str | None = None, max_attempts: int | None = None,
                state: str | Path | None = None) -> NodeClient:
    """A client node for ``config``'s algorithm holding the examples in ``data`` (``.npz``).

    It reconnects with backoff (capped at ``network.reconnect_max_s``) and gives up after
    ``network.patience_s`` seconds without a connection (0: never), raising a
    :class:`~shoal.errors.TransportError` that explains the last failed attempt.

    ``state`` is a file where the node keeps what the algorithm stores on it between rounds
    (SCAFFOLD's control variate): read at start when it exists, rewritten after every change,
    so a restarted client continues with its state. It never leaves this machine."""
    refuse_simulation_only(config, "join")
    task = load_task(config.task.name, **config.task.options)
    config = resolve_config(config, task)
    model, _ = initial_params(config, task)
    algorithm, _ = build_federated(config, task, make_dataset(config, task), model)
    net = config.network
    store = load_node_store(state) if state is not None and Path(state).exists() else NodeStore()
    persist = None if state is None else functools.partial(save_node_store, state)
    ident = _identity(net, node_id)
    creds = (None if ident is None else
             CertificateCredentials.from_pem(node_id, *ident.read()))
    node = Node(NodeContext(node_id, load_client_data(data), store=store, credentials=creds),
                algorithm.handlers(), persist=persist)
    return NodeClient(address or net.address, node, identity=_identity(net, node_id),
                      insecure=net.insecure, server_name=net.server_name or None,
                      max_message_bytes=int(net.max_message_mb * 2**20),
                      chunk_size=net.chunk_kb * 1024,
                      backoff=Backoff(0.2, net.reconnect_max_s), max_attempts=max_attempts,
                      patience=net.patience_s or None)


def join(config: Config, node_id: str, data: str | Path, *, address: str | None = None,
         stop: threading.Event | None = None, state: str | Path | None = None) -> str:
    """Run a client until the coordinator ends the run (BYE); returns the coordinator's reason
    (``state``: see :func:`node_client`). A RESTART or a lost connection is waited out, up to
    ``network.patience_s``; a refusal or running out of patience raises
    :class:`~shoal.errors.TransportError`."""
    client = node_client(config, node_id, data, address=address, state=state)
    if stop is not None:
        def watch() -> None:
            stop.wait()
            client.stop()
        threading.Thread(target=watch, daemon=True).start()
    return client.run()


