"""``shoal swarm join``: one swarm peer, deployed — etcd for the ledger, its own blob server.

A :class:`SwarmNode` runs the same :class:`~shoal.algorithms.swarm.SwarmPeer` as the
simulation, built from the same config (:func:`shoal.experiment.build_swarm` supplies the
client update, the merge and the weight caps), with the deployment's pieces underneath:

* the ledger on an etcd cluster (:class:`~shoal.ledger.etcd.EtcdStore`, mutual TLS, the
  certificate enrollment issued; etcd's RBAC lets it write under its own prefix only);
* its updates and merged models as content-addressed blobs in a bounded
  :class:`~shoal.ledger.blobs.BlobStore`, mirrored to ``blob_dir`` so a restarted peer serves
  them again, and served by a :class:`~shoal.ledger.blob_service.BlobServer` (mutual TLS; a device
  that is not enrolled, or revoked, on the ledger is refused);
* its peers' blobs fetched with a :class:`~shoal.ledger.blob_service.BlobClient` and used only when
  their SHA-256 is the one their signed entry names.

A peer that starts (or restarts after a crash or a cut) catches up from the ledger: it takes
the newest round that peers merged, adopts the merged model most of them recorded (fetched by
its hash from one of them and checked), and continues with the next round. It does the same
at the start of every round when its own merged model was not the majority's (it is flagged in
the log). A round it had already published in is not published again (entries are written
once); it merges with the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .. import tree
from ..algorithms.swarm import SwarmPeer, model_hash
from ..config import Config
from ..data.tasks import load_task
from ..errors import ConfigError, TransportError
from ..experiment import build_swarm, initial_params, make_dataset, resolve_config
from ..ledger.blob_service import BlobClient, BlobServer
from ..ledger.blobs import BlobError, BlobStore, blob_hash, blob_params
from ..ledger.enroll import SwarmIdentity
from ..ledger.entry import Entry
from ..ledger.etcd import EtcdStore
from ..ledger.ledger import Ledger, RoundView
from ..tree import Params
from .clientdata import load_client_data
from .deploy import refuse_simulation_only

__all__ = ["PeerBlobs", "SwarmNode", "SwarmOutcome", "newest_agreed"]

log = logging.getLogger(__name__)

PREFETCH_THREADS = 8
"""Blobs a peer fetches at once after a round closes."""

ALLOWED_CACHE_S = 2.0
"""How long the blob server trusts its last read of who is enrolled and not revoked when its
watch of revocations falls behind (while the watch runs, a revocation takes effect as soon as
the ledger records it)."""

REGISTRY_WATCH_S = 10.0
"""How long the registry's follower waits for a revocation before it reads the registry again
(a device the blob server does not know yet makes it read the registry at once)."""

REGISTRY_READ_S = 0.5
"""The least time between two reads of the registry for devices the blob server does not know
(a stranger asking again and again costs the ledger one read per this long)."""


class PeerBlobs:
    """A deployed peer's :class:`~shoal.algorithms.swarm.BlobAccess`: its own blob server
    (``publish`` returns its advertised address) and a client for its peers'."""

    def __init__(self, store: BlobStore, client: BlobClient, address: str,
                 blob_dir: Path | None = None, patience: float = 0.0):
        self.store = store
        self.client = client
        self.address = address
        self.blob_dir = blob_dir
        self.patience = patience
        if blob_dir is not None:
            blob_dir.mkdir(parents=True, exist_ok=True)
            for f in sorted(blob_dir.glob("*.blob")):
                data = f.read_bytes()
                if blob_hash(data) == f.stem:  # a torn or altered file is not served
                    store.put(data)

    def publish(self, data: bytes) -> str:
        """Keep ``data`` (in memory and in ``blob_dir``); where peers fetch it."""
        sha = self.store.put(data)
        if self.blob_dir is not None:
            path = self.blob_dir / f"{sha}.blob"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
        return self.address

    def keep(self, shas: set[str]) -> None:
        """Keep only the blobs ``shas`` on disk and pinned in memory (older ones may go)."""
        self.store.keep(shas)
        if self.blob_dir is not None:
            for f in self.blob_dir.glob("*.blob"):
                if f.stem not in shas:
                    f.unlink(missing_ok=True)

    def prefetch(self, entries: list[Entry]) -> None:
        """Fetch the blobs of ``entries`` at once, in threads, into our store (what fails is
        fetched again, and reported, by :meth:`fetch`)."""
        todo = [e for e in entries if e.blob not in self.store]
        if not todo:
            return

        def get(e: Entry) -> None:
            with contextlib.suppress(TransportError):
                self.store.put(self.client.fetch(e.endpoint, e.blob))
        with ThreadPoolExecutor(min(len(todo), PREFETCH_THREADS)) as pool:
            list(pool.map(get, todo))

    def fetch(self, entry: Entry) -> bytes:
        """The blob ``entry`` names, from its author's endpoint (or our own store). A peer
        out of reach is tried again for up to ``patience`` seconds (it may be restarting: it
        serves its blobs again from its ``blob_dir``); a refusal, a wrong hash or a missing
        blob is final."""
        own = self.store.get(entry.blob)
        if own is not None:
            return own
        deadline, wait = time.monotonic() + self.patience, 0.1
        while True:
            try:
                return self.client.fetch(entry.endpoint, entry.blob)
            except BlobError:
                raise
            except TransportError:
                if time.monotonic() + wait > deadline:
                    raise
                time.sleep(wait)
                wait = min(2 * wait, 2.0)


@dataclass
class SwarmOutcome:
    """How a peer's run ended: rounds done, the final model's hash, and per round what it
    merged (``history``: round, hash, included, failed, mismatches, train metrics)."""

    rounds: int
    hash: str
    history: list[dict[str, Any]] = field(default_factory=list)


class SwarmNode:
    """One deployed swarm peer; see the module docstring.

    Args:
        config: the job (``paradigm = "swarm"``; ``[swarm]`` names the etcd endpoints).
        device: this peer's enrolled id.
        data: its examples (``.npz``, as ``shoal split`` writes them).
        identity: what ``shoal swarm enroll`` gave it (default: from ``swarm.identity_dir``).
        out: where it writes ``metrics.jsonl``, ``model.safetensors`` and its ``blobs/``.
    """

    def __init__(self, config: Config, device: str, data: str | Path, *,
                 identity: SwarmIdentity | None = None, out: str | Path | None = None,
                 listen: str | None = None):
        if config.paradigm != "swarm":
            raise ConfigError(f"swarm join: the config's paradigm is {config.paradigm!r}; "
                              "set paradigm = \"swarm\".")
        refuse_simulation_only(config, "swarm join")
        sw = config.swarm
        if not sw.endpoints:
            raise ConfigError("config field 'swarm.endpoints': empty; list the etcd members' "
                              "client addresses, e.g. [\"10.0.0.1:2379\", \"10.0.0.2:2379\", "
                              "\"10.0.0.3:2379\"].")
        if identity is None:
            if not sw.identity_dir:
                raise ConfigError("config field 'swarm.identity_dir': empty; set it to the "
                                  "directory `shoal swarm enroll` wrote this device's files to.")
            identity = SwarmIdentity.load(sw.identity_dir, device)
        task = load_task(config.task.name, **config.task.options)
        config = resolve_config(config, task)
        model, self.params0 = initial_params(config, task)
        swarm, _ = build_swarm(config, task, make_dataset(config, task), model)
        self.config, self.device, self.identity = config, device, identity
        self.data = load_client_data(data)
        self.out = Path(out) if out is not None else None
        self.ledger = Ledger(EtcdStore(sw.endpoints, identity.tls))
        # The blob server's threads read the registry through a ledger of their own (a
        # Ledger's caches are not shared between threads; the store is).
        self._registry = Ledger(self.ledger.store)
        self.store = BlobStore()
        host, _, port = (listen or sw.listen).rpartition(":")
        crl = identity.tls.ca.parent / "crl.pem"
        self.server = BlobServer(self.store, identity.tls, host=host or "127.0.0.1",
                                 port=int(port or 0), crl=crl if crl.is_file() else None,
                                 allowed=self._allowed)
        address = sw.advertise or self.server.address
        self.client = BlobClient(identity.tls)
        self.blobs = PeerBlobs(self.store, self.client, address,
                               self.out / "blobs" if self.out is not None else None,
                               patience=sw.close_timeout_s)
        self.peer = SwarmPeer(device, identity.signer(), self.ledger, self.blobs,
                              swarm.client_update, reducer=swarm.reducer, job=sw.job,
                              min_peers=sw.min_peers or max(1, len(self.ledger.active())),
                              close_timeout=sw.close_timeout_s, weight_cap=swarm.weight_cap,
                              seed=config.seed)
        self._active: tuple[float, set[str]] = (0.0, set())
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._revocations = threading.Thread(target=self._follow_registry, daemon=True,
                                             name=f"shoal-swarm-registry-{device}")
        self._revocations.start()

    def __repr__(self) -> str:
        return f"SwarmNode({self.device!r}, blobs at {self.blobs.address})"

    def _allowed(self, node_id: str) -> str | None:
        """Why ``node_id`` may not fetch our blobs (not enrolled, or revoked), or ``None``."""
        with self._lock:
            at, active = self._active
            now = time.monotonic()
            stale = now - at > REGISTRY_WATCH_S + ALLOWED_CACHE_S  # the follower is behind
            if stale or (node_id not in active and now - at > REGISTRY_READ_S):
                active = set(self._registry.active())  # (or the device enrolled just now)
                self._active = (now, active)
        return None if node_id in active else (f"{node_id!r} is not an enrolled, unrevoked "
                                               "device of this swarm's ledger")

    def _follow_registry(self) -> None:
        """Keep the blob server's view of the enrolled, unrevoked devices current: read the
        registry, then wait (at most :data:`REGISTRY_WATCH_S`) for a revocation of one of
        them, and read it again — so a revoked device is refused from the moment the ledger
        records its revocation, not up to a cache's age later."""
        registry = Ledger(self.ledger.store)  # this thread's own (a Ledger's caches are not
        while not self._closing.is_set():     # shared between threads)
            try:
                enrolled, revision = registry.enrolled_at()
                active = {d for d, e in enrolled.items() if e.revoked is None}
                with self._lock:
                    self._active = (time.monotonic(), active)
                registry.wait_revocation(sorted(active), revision, REGISTRY_WATCH_S)
            except TransportError as e:  # the store is closing, or unreachable for now
                log.debug("swarm: reading the registry failed (%s); retrying", e)
                self._closing.wait(0.5)

    def close(self) -> None:
        """Stop the blob server and close the connections."""
        self._closing.set()
        self.server.stop()
        self.client.close()
        self.ledger.store.close()  # (which also ends the registry follower's wait)
        self._revocations.join(REGISTRY_WATCH_S)

    def __enter__(self) -> SwarmNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catching up -----------------------------------------------------------------------

    def _latest_merged(self, rounds: int) -> tuple[int, Entry | None]:
        """:func:`newest_agreed` model of this job, at least ``min_peers`` peers agreeing."""
        return newest_agreed(self.ledger, self.peer.job, rounds, self.peer.min_peers)

    def _adopt(self, entry: Entry, template: Params) -> Params:
        """The merged model ``entry`` names, from one of the peers that hold it."""
        view = self.ledger.read_round(self.peer.job, entry.round)
        holders = [e for _, (e, _) in sorted(view.merged.items()) if e.blob == entry.blob]
        problems = []
        for e in holders:
            try:
                data = self.blobs.fetch(e)
            except TransportError as err:
                problems.append(f"{e.device}: {err}")
                continue
            if blob_hash(data) == entry.blob:
                self.blobs.publish(data)
                return blob_params(data, template)
            problems.append(f"{e.device}: its blob's hash differs")
        raise TransportError(f"swarm: no peer serves the merged model {entry.blob[:12]} of round "
                             f"{entry.round} ({'; '.join(problems) or 'none holds it'}).")

    # -- the loop --------------------------------------------------------------------------

    def run(self, rounds: int | None = None, stop: threading.Event | None = None) -> SwarmOutcome:
        """Take part in rounds until ``rounds`` (default ``federated.rounds``) are merged, or
        ``stop`` is set."""
        rounds = rounds or self.config.federated.rounds
        params, base = tree.clone(self.params0), model_hash(self.params0)
        done, latest = self._latest_merged(rounds)
        if latest is not None:
            log.info("swarm: %s catches up to round %d (model %s)", self.device, done,
                     latest.blob[:12])
            params, base = self._adopt(latest, params), latest.blob
        outcome = SwarmOutcome(done, base)
        for r in range(done + 1, rounds + 1):
            if stop is not None and stop.is_set():
                break
            last, view = self.ledger.read_rounds(self.peer.job, [r - 1, r])
            majority = _majority(last.merged, own=base)
            if majority is not None and majority.blob != base:  # we were the odd one out
                log.warning("swarm round %d: our merged model %s is not the one most peers "
                            "recorded (%s); adopting theirs", r - 1, base[:12],
                            majority.blob[:12])
                params, base = self._adopt(majority, params), majority.blob
            row: dict[str, Any] = {"round": r, "time/start": time.time()}
            if r > 1:
                row["mismatches"] = sorted(d for d, (e, _) in last.merged.items()
                                           if e.blob != base)
            t = time.perf_counter()
            if self.device not in view.updates and not view.closes:
                row.update(self.peer.train(params, base, self.data.train, r).metrics)
            row["time/train_s"], t = time.perf_counter() - t, time.perf_counter()
            row["time/published"] = time.time()

            def fetch_published(v: RoundView, base: str = base) -> None:
                self.blobs.prefetch([e for d, (e, _) in sorted(v.updates.items())
                                     if e.base == base and d != self.device])
            view = self.peer.wait_close(r, base, seen=fetch_published)
            row["time/closed"] = time.time()
            row["time/wait_s"], t = time.perf_counter() - t, time.perf_counter()
            fetch_published(view)
            row["time/fetch_s"], t = time.perf_counter() - t, time.perf_counter()
            result = self.peer.merge(r, params, base, view)
            row["time/merge_s"] = time.perf_counter() - t
            row.update({"hash": result.hash, "included": result.included,
                        "failed": result.failed, "refused": result.refused})
            params, base = result.params, result.hash
            self.blobs.keep({base} | {e.blob for e, _ in view.updates.values()
                                      if e.device == self.device})
            outcome.rounds, outcome.hash = r, base
            row["time/end"] = time.time()
            outcome.history.append(row)
            self._record(row)
        self._linger(outcome.rounds)
        if self.out is not None:
            save_file({k: v.contiguous() for k, v in params.items()},
                      str(self.out / "model.safetensors"))
        self.params = params
        return outcome

    def _linger(self, round: int) -> None:
        """Keep serving our blobs until every active peer has merged ``round`` (or
        ``close_timeout_s`` passes): a peer that leaves first must not leave the slower ones
        without its update."""
        deadline = time.monotonic() + self.config.swarm.close_timeout_s
        while round > 0:
            view = self.ledger.read_round(self.peer.job, round)
            if set(view.active) <= set(view.merged) or time.monotonic() >= deadline:
                return
            self.ledger.wait(self.peer.job, view.revision, max(0.0, deadline - time.monotonic()),
                             round=round, kinds=("merged",))

    def _record(self, row: dict[str, Any]) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def newest_agreed(ledger: Ledger, job: str, rounds: int,
                  quorum: int) -> tuple[int, Entry | None]:
    """Where a (re)starting peer catches up to: the newest round, up to the job's ``rounds``,
    whose majority merged model (:func:`_majority`) at least ``quorum`` peers recorded, and
    that entry; ``(0, None)`` for none.

    Rounds are read while they hold merged entries (each by its entries' exact keys,
    :meth:`~shoal.ledger.ledger.Ledger.read_rounds`; none past the job's end). The quorum is
    the swarm's ``min_peers``, the fewest updates a round merges: one enrolled peer that
    records a merged entry of its own for a round the swarm has not reached (validly signed,
    under its own prefix) is outvoted there, and a peer catching up never adopts its model;
    the rounds after the agreed one are merged again from their updates by the peer itself."""
    r = 0
    agreed: tuple[int, Entry | None] = (0, None)
    while r < rounds and (view := ledger.read_round(job, r + 1)).merged:
        r += 1
        best = _majority(view.merged)
        if best is not None and _votes(view.merged, best.blob) >= quorum:
            agreed = (r, best)
    return agreed


def _votes(merged: dict[str, tuple[Entry, int]], blob: str) -> int:
    return sum(e.blob == blob for e, _ in merged.values())


def _majority(merged: dict[str, tuple[Entry, int]], own: str = "") -> Entry | None:
    """The merged entry whose model hash most peers recorded (ties: ``own``, this peer's
    model, when it is among them, so one other peer can never outvote us in a tie; else the
    first device in sorted order); ``None`` when no merged entry names a model (failed rounds
    keep theirs)."""
    votes = Counter(e.blob for e, _ in merged.values() if e.blob)
    if not votes:
        return None
    best = max(votes.values())
    tied = [e for _, (e, _) in sorted(merged.items()) if votes.get(e.blob) == best]
    return next((e for e in tied if e.blob == own), tied[0])
