"""``Swarm``: swarm learning — peers without an aggregator, on a signed, replicated ledger.

Each round every peer (:class:`SwarmPeer`, the same code in simulation and deployment):

1. trains its ``ClientUpdate`` from the model it holds, keeps the update as a content-addressed
   blob and appends an ``"update"`` entry (the blob's SHA-256, the hash of the model it trained
   from, its weight, its metrics, where the blob is served) to the ledger;
2. waits until every active peer has published (then the first active peer in sorted order
   closes the round at once; the others after a grace, should it be down) — or until
   ``close_timeout`` seconds pass (then any peer closes it). The closer first fetches and
   checks every published update's blob, and its ``"close"`` entry lists those it holds. The
   earliest close (by the store's revision, which every reader agrees on) decides the round: it
   merges the updates it lists that were trained from the round's model. A round with fewer
   than ``min_peers`` fails and leaves the model unchanged; the ledger keeps the close that says
   so;
3. fetches each included blob from the peer that made it — or, when that peer is gone, from the
   closer, which holds them all — uses it only if its SHA-256 is the one its signed entry
   names, and merges the updates in one fixed order (sorted device ids)
   with the reducer — weighted mean (weights capped as in FedAvg), coordinate median, trimmed
   mean or geometric median — so every honest peer computes the bit-identical model, whose hash
   it records in a ``"merged"`` entry. A peer whose merged hash differs is flagged.

With mean merging and every peer publishing, a round is exactly FedAvg's round with the same
clients and seed (each peer trains with the seed FedAvg gives that client, and the merge folds
in FedAvg's order with FedAvg's arithmetic).

In simulation, :class:`Swarm` is the Algorithm the one loop (:func:`shoal.run.run`) drives: its
"round" only ticks each peer's clock (``"swarm.train"``, then ``"swarm.merge"``); the peers
keep their models in their node state and fetch blobs from each other over the transport
(``"swarm.blob"``, counted per link). The model it reports for evaluation is the one most peers
hold (read where a peer keeps it: the simulation's instrument, not traffic); a peer holding
another is flagged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .. import tree
from ..aggregate import Fold, Reducer, weighted_mean
from ..algorithm import RoundReport
from ..client import ClientUpdate
from ..errors import ConfigError
from ..ledger.blobs import blob_bytes, blob_hash, blob_params
from ..ledger.entry import Entry, Signer
from ..ledger.ledger import Ledger, RoundView
from ..message import COORDINATOR, Message
from ..metrics import weighted_average
from ..node import Handler, NodeContext
from ..seeding import derive_seed
from ..transport import Transport
from ..tree import Params
from ..types import ClientInfo
from .cohort import Cohort
from .fedavg import train_data
from .influence import WeightCap, client_metrics

__all__ = ["BLOB", "MERGE", "TRAIN", "BlobAccess", "MergeResult", "Swarm", "SwarmPeer", "SwarmState", "assemble",
           "decide_round", "model_hash"]

log = logging.getLogger(__name__)

TRAIN, MERGE, BLOB = "swarm.train", "swarm.merge", "swarm.blob"

CLOSER_GRACE_S = 2.0
"""How long the other peers leave the first active peer (sorted) to close a round in which
every active peer published, before they close it themselves."""


def model_hash(params: Params) -> str:
    """The SHA-256 of ``params``' canonical blob (what entries name as ``base``)."""
    return blob_hash(blob_bytes(params))


class BlobAccess(Protocol):
    """How a peer keeps its blobs and gets its peers': ``publish(data) -> endpoint`` (keep and
    serve it; where others fetch it), ``address`` (that endpoint) and ``fetch(entry) -> bytes``
    (the blob ``entry`` names, from our own store or the entry's endpoint; the caller checks
    the hash)."""

    address: str

    def publish(self, data: bytes) -> str:
        """Keep and serve ``data``; where peers fetch it."""
        ...

    def fetch(self, entry: Entry) -> bytes:
        """The blob ``entry`` names."""
        ...


@dataclass
class MergeResult:
    """How a round ended for one peer: the model, its hash, the devices merged (in order),
    why the round failed (``None`` if it did not), and what was refused."""

    params: Params
    hash: str
    included: list[str]
    failed: str | None = None
    refused: dict[str, str] = field(default_factory=dict)
    close: Entry | None = None


def decide_round(view: RoundView, base: str) -> tuple[Entry | None, list[str], dict[str, str]]:
    """The round's decision from ``view``: the earliest close (``None``: not closed yet), the
    devices whose updates it merges (sorted) — those the close lists, each with a valid update
    entry written before the close and trained from ``base`` — and the updates it leaves out,
    with why."""
    if not view.closes:
        return None, [], {}
    device, (close, at) = min(view.closes.items(), key=lambda kv: (kv[1][1], kv[0]))
    listed = set(close.included)
    included: list[str] = []
    left: dict[str, str] = {}
    for d, (e, rev) in sorted(view.updates.items()):
        if rev > at:
            left[d] = f"published after the round was closed by {device!r}"
        elif d not in listed:
            left[d] = (f"not in {device!r}'s close (its blob could not be fetched and checked "
                       "when the round closed)")
        elif e.base != base:
            left[d] = f"trained from another model ({e.base[:12]}, not {base[:12]})"
        elif not e.blob:
            left[d] = "names no blob"
        else:
            included.append(d)
    return close, included, left


def assemble(view: RoundView, params: Params, base: str, *, reducer: Reducer,
             min_peers: int, weight_cap: WeightCap | None,
             fetch: Callable[[Entry], bytes],
             own: Mapping[str, Params] | None = None) -> MergeResult:
    """The model a closed round ``view`` gives, from ``params`` (hash ``base``): the included
    updates (:func:`decide_round`) fetched with ``fetch`` (or taken from ``own``), each used
    only if its SHA-256 is the one its signed entry names, folded in sorted device order with
    ``reducer`` (weights capped by ``weight_cap``) and added to ``params``. Every honest peer —
    and any enrolled reader of the ledger — computes the same bits."""
    close, devices, refused = decide_round(view, base)
    if close is None:
        raise ValueError("assemble() needs a closed round (see SwarmPeer.wait_close)")
    for d, why in refused.items():
        log.info("swarm round %d: %s's update left out: %s", view.round, d, why)
    updates: list[tuple[str, Params, float]] = []
    for d in devices:
        entry = view.updates[d][0]
        got = own.get(d) if own else None
        if got is None:
            got = _fetched(entry, params, fetch, refused, close)
        if got is None:
            continue
        weight = entry.examples
        if weight_cap is not None:
            weight, clipped = weight_cap.clip(d, weight)
            if clipped:
                log.info("swarm round %d: %s's weight capped to %g", view.round, d, weight)
        updates.append((d, got, weight))
    if len(updates) < max(min_peers, reducer.min_updates):
        failed = (f"only {len(updates)} usable updates when {close.device!r} closed the round "
                  f"({close.reason}); min_peers is {min_peers}")
        return MergeResult(params, base, [], failed, refused, close)
    fold = Fold(reducer, params)
    for _, u, w in updates:
        fold.add(u, w)
    reduced, _ = fold.finish()
    if reduced is None or not tree.is_finite(reduced):
        return MergeResult(params, base, [], "the merged update is not finite", refused, close)
    merged = {k: p + 1.0 * reduced[k] for k, p in params.items()}  # FedAvg's sgd(1.0)
    return MergeResult(merged, model_hash(merged), [d for d, _, _ in updates], None, refused,
                       close)


def _fetched(entry: Entry, template: Params, fetch: Callable[[Entry], bytes],
             refused: dict[str, str], close: Entry) -> Params | None:
    """The update ``entry`` names, if its blob can be fetched — from its author, else from
    the peer that closed the round (which fetched it before closing) — matches its hash and
    fits."""
    try:
        try:
            data = fetch(entry)
        except Exception:  # noqa: BLE001 - the author may be gone; the closer holds a copy
            if not close.endpoint or close.device == entry.device:
                raise
            data = fetch(dataclasses.replace(entry, endpoint=close.endpoint))
    except Exception as e:  # noqa: BLE001 - a peer's failure is its own; the round goes on
        refused[entry.device] = f"its blob could not be fetched ({e})"
    else:
        if blob_hash(data) != entry.blob:
            refused[entry.device] = (f"its blob's SHA-256 is {blob_hash(data)[:12]}, not the "
                                     f"{entry.blob[:12]} its signed entry names; refused")
        else:
            try:
                return blob_params(data, template)
            except Exception as e:  # noqa: BLE001 - a malformed blob is refused, not fatal
                refused[entry.device] = f"its blob is not an update of this model ({e})"
    log.warning("swarm round %d: %s: %s", entry.round, entry.device, refused[entry.device])
    return None


def _merging(reducer: Reducer | None, min_peers: int) -> Reducer:
    """``reducer`` (default: the example-weighted mean), if ``min_peers`` updates suffice."""
    reducer = reducer if reducer is not None else weighted_mean()
    if min_peers < reducer.min_updates:
        raise ConfigError(f"swarm: min_peers is {min_peers}, but {reducer!r} needs at least "
                          f"{reducer.min_updates} updates; raise min_peers.")
    return reducer


class SwarmPeer:
    """One peer of a swarm: trains, publishes, closes and merges rounds; see the module
    docstring.

    Args:
        device: this peer's id (its enrolled device name).
        signer: its Ed25519 key for ledger entries.
        ledger: the ledger (etcd or in-process store underneath).
        blobs: where its blobs are served and its peers' are fetched.
        client_update: local training (``local_sgd``, DP-SGD, ...).
        reducer: how updates are merged.
        job: the job's name on the ledger (one ledger serves many jobs).
        min_peers: fewest updates a round merges; fewer fail the round.
        close_timeout: seconds to wait for every active peer before closing with fewer.
        weight_cap: the most weight a peer's claimed example count gives it.
        seed: the run's seed (each peer's training randomness derives from it, as FedAvg's).
    """

    def __init__(self, device: str, signer: Signer, ledger: Ledger, blobs: BlobAccess,
                 client_update: ClientUpdate, *, reducer: Reducer | None = None,
                 job: str = "job", min_peers: int = 1, close_timeout: float = 60.0,
                 weight_cap: WeightCap | None = None, seed: int = 0):
        if signer.node_id != device:
            raise ConfigError(f"swarm: peer {device!r} was given the signing key of "
                              f"{signer.node_id!r}; each peer signs with its own key.")
        self.device = device
        self.signer = signer
        self.ledger = ledger
        self.blobs = blobs
        self.client_update = client_update
        self.reducer = _merging(reducer, min_peers)
        self.job = job
        self.min_peers = min_peers
        self.close_timeout = close_timeout
        self.weight_cap = weight_cap
        self.seed = seed

    def __repr__(self) -> str:
        return f"SwarmPeer({self.device!r}, job={self.job!r}, {self.reducer!r})"

    def train(self, params: Params, base: str, data: Any, round: int) -> Entry:
        """Train from ``params`` (hash ``base``) and publish the update; the signed entry."""
        info = ClientInfo(self.device, round, derive_seed(self.seed, "client", round,
                                                          self.device), {})
        result = self.client_update(params, data, info)
        blob = blob_bytes(result.update)
        endpoint = self.blobs.publish(blob)
        metrics, _ = client_metrics(result.metrics, None)
        return self.ledger.append(Entry(
            self.job, round, self.device, "update", 0, blob=blob_hash(blob), base=base,
            examples=float(result.weight), metrics=metrics, endpoint=endpoint), self.signer)

    def wait_close(self, round: int, base: str, wait_s: float | None = None,
                   seen: Callable[[RoundView], None] | None = None) -> RoundView:
        """Wait until the round is closed (closing it when every active peer has published,
        or when ``wait_s`` — default ``close_timeout`` — has passed); the view that holds the
        deciding close. ``seen(view)`` is called with every view read while waiting (a
        deployed peer fetches the updates published so far meanwhile)."""
        deadline = time.monotonic() + (self.close_timeout if wait_s is None else wait_s)
        everyone: float | None = None  # when we first saw every active peer published
        view = self.ledger.read_round(self.job, round)
        while True:
            if view.closes:
                return view
            active = view.active
            ready = [d for d, (e, _) in view.updates.items() if e.base == base]
            now = time.monotonic()
            left = deadline - now
            if set(active) <= set(view.updates) and everyone is None:
                everyone = now
            # One close is enough: the first active peer in sorted order writes it at once,
            # the others only if it has not after CLOSER_GRACE_S (it may be down).
            if left <= 0 or (everyone is not None and (
                    self.device == min(active, default="") or now - everyone >= CLOSER_GRACE_S)):
                reason = (f"all {len(active)} active peers published" if left > 0 else
                          f"timeout: {len(ready)} of {len(active)} active peers published "
                          f"within {self.close_timeout:g} s")
                # The close lists the updates this peer holds and checked: it serves them to
                # the others, should their authors be gone, so every peer merges the same set.
                if seen is not None:  # a deployed peer fetches them all at once
                    seen(view)
                have = tuple(d for d in sorted(ready) if self._obtain(view.updates[d][0]))
                self.ledger.append(Entry(self.job, round, self.device, "close", 0, base=base,
                                         included=have, reason=reason,
                                         endpoint=self.blobs.address), self.signer)
                view = self.ledger.read_round(self.job, round)
                continue
            if seen is not None:  # only now: a close to write goes first
                seen(view)
            wake = left if everyone is None else CLOSER_GRACE_S - (now - everyone)
            # Follow the round's new entries as the store announces them (no re-reading).
            self.ledger.follow(view, max(0.0, min(wake, left, 5.0)))

    def _obtain(self, entry: Entry) -> bool:
        """Fetch ``entry``'s blob, check its hash and keep it (to serve it); whether that
        worked."""
        try:
            data = self.blobs.fetch(entry)
        except Exception as e:  # noqa: BLE001 - left out of the close, with the reason logged
            log.warning("swarm round %d: %s's blob could not be fetched (%s); it is left out of "
                        "the round", entry.round, entry.device, e)
            return False
        if blob_hash(data) != entry.blob:
            log.warning("swarm round %d: %s: its blob's SHA-256 is %s, not the %s its signed "
                        "entry names; refused", entry.round, entry.device, blob_hash(data)[:12],
                        entry.blob[:12])
            return False
        self.blobs.publish(data)
        return True

    def merge(self, round: int, params: Params, base: str, view: RoundView,
              own: Mapping[str, Params] | None = None) -> MergeResult:
        """Merge the round ``view`` decides onto ``params`` (hash ``base``) with
        :func:`assemble` and record the merged hash; ``own`` holds updates this peer already
        has (its own), by device."""
        result = assemble(view, params, base, reducer=self.reducer, min_peers=self.min_peers,
                          weight_cap=self.weight_cap, fetch=self.blobs.fetch, own=own)
        # The merged model is served too: a peer that rejoins fetches it by its hash.
        endpoint = self.blobs.publish(blob_bytes(result.params))
        self.ledger.append(Entry(self.job, round, self.device, "merged", 0, blob=result.hash,
                                 base=base, included=tuple(result.included), endpoint=endpoint,
                                 reason=result.failed or ""), self.signer)
        return result


# -- simulation -------------------------------------------------------------------------------

@dataclass
class SwarmState:
    """The swarm's model (the one most peers hold) and its hash."""

    params: Params
    hash: str


class _SimBlobs:
    """A simulated peer's blobs: kept in its scratch space, fetched over the transport."""

    def __init__(self, context: NodeContext, round: int):
        self.context = context
        self.round = round
        self.store: dict[str, bytes] = context.state.setdefault("swarm.blobs", {})
        self.address = context.node_id

    def publish(self, data: bytes) -> str:
        self.store[blob_hash(data)] = data
        return self.address

    def fetch(self, entry: Entry) -> bytes:
        if entry.blob in self.store:
            return self.store[entry.blob]
        peers = self.context.peers
        if peers is None:
            raise ConfigError("swarm: this transport gives nodes no link to their peers")
        reply = peers.request([Message(BLOB, self.context.node_id, entry.endpoint, self.round,
                                       config={"sha256": entry.blob})])[0]
        if reply.error is not None:
            raise RuntimeError(reply.error)
        return bytes(reply.tensors["blob"].numpy().tobytes())


class Swarm:
    """Swarm learning in simulation; see the module docstring. The peers are the transport's
    nodes; ``ledger`` is an in-process ledger whose registry enrolls them, ``signers(node_id)``
    gives each its key (:class:`~shoal.credentials.RunKeys` in simulation)."""

    def __init__(self, client_update: ClientUpdate, ledger: Ledger,
                 signers: Callable[[str], Signer], *, reducer: Reducer | None = None,
                 min_peers: int = 1, weight_cap: WeightCap | None = None, seed: int = 0,
                 job: str = "sim"):
        self.client_update = client_update
        self.ledger = ledger
        self.signers = signers
        self.reducer = _merging(reducer, min_peers)
        self.min_peers = min_peers
        self.weight_cap = weight_cap
        self.seed = seed
        self.job = job
        self.cohort = Cohort()  # every peer, every round (what DP accounting needs to know)
        self._params0: Params | None = None

    def __repr__(self) -> str:
        return f"Swarm({self.client_update!r}, {self.reducer!r}, min_peers={self.min_peers})"

    def peer(self, device: str, blobs: BlobAccess) -> SwarmPeer:
        """The peer ``device`` of this swarm."""
        return SwarmPeer(device, self.signers(device), self.ledger, blobs, self.client_update,
                         reducer=self.reducer, job=self.job, min_peers=self.min_peers,
                         close_timeout=0.0, weight_cap=self.weight_cap, seed=self.seed)

    def init(self, params: Params) -> SwarmState:
        """Every peer starts from ``params`` (built from the run's config, as in deployment)."""
        self._params0 = tree.clone(params)
        return SwarmState(tree.clone(params), model_hash(params))

    def params(self, state: SwarmState) -> Params:
        """The model most peers hold."""
        return state.params

    def round(self, state: SwarmState, transport: Transport,
              round: int) -> tuple[SwarmState, RoundReport]:
        """Tick every peer's clock: train and publish, then close and merge."""
        peers = list(transport.nodes())
        report = RoundReport(round)
        if self._params0 is None:  # resumed from a checkpoint: peers hold their own models
            self._params0 = tree.clone(state.params)
        trained = transport.request([Message(TRAIN, COORDINATOR, p, round) for p in peers])
        for r in trained:
            if r.error is not None:
                report.dropped[r.src] = r.error
        merged = transport.request([Message(MERGE, COORDINATOR, p, round,
                                            config={"wait_s": 0.0}) for p in peers])
        done = [r for r in merged if r.error is None]
        for r in merged:
            if r.error is not None:
                report.dropped.setdefault(r.src, r.error)
        m = report.metrics
        ok = [r for r in trained if r.error is None]
        if ok:
            m.update({k: v for k, v in weighted_average(
                [{**r.metrics, "weight": r.config.get("weight", 1.0)} for r in ok],
                "weight").items() if k != "weight"})
            m["train/examples"] = math.fsum(r.metrics.get("train/examples", 0.0) for r in ok)
        m["round/sampled"] = float(len(peers))
        m["round/dropped"] = float(len(report.dropped))
        if not done:
            report.failed = "no peer finished the round"
            report.retry = True
            return state, report
        # The swarm's model: the one most peers hold (ties: the first peer's in sorted order).
        votes = Counter(str(r.config.get("merged")) for r in done)
        agreed, _ = max(votes.items(), key=lambda kv: (kv[1], -min(
            i for i, r in enumerate(done) if r.config.get("merged") == kv[0])))
        holder = next(r for r in done if r.config.get("merged") == agreed)
        mismatched = sorted(r.src for r in done if r.config.get("merged") != agreed)
        for p in mismatched:
            log.warning("swarm round %d: %s's merged model differs from the one %d of %d "
                        "peers hold (%s)", round, p, votes[agreed], len(done), agreed[:12])
        m["round/replied"] = float(holder.metrics.get("swarm/included", 0.0))
        m["swarm/merged_hash_mismatches"] = float(len(mismatched))
        m["swarm/refused"] = float(holder.metrics.get("swarm/refused", 0.0))
        if holder.config.get("failed"):
            report.failed = str(holder.config["failed"])
            report.retry = True
            return state, report
        # Read where the holder keeps it (the simulation's instrument: not traffic).
        params = transport.context(holder.src, round + 1).node_state["model"]  # type: ignore[attr-defined]
        m["update/norm"] = tree.norm(tree.sub(params, state.params))
        return SwarmState(tree.clone(params), agreed), report

    # -- the peers' side ------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """``"swarm.train"``, ``"swarm.merge"`` and ``"swarm.blob"`` (serve a blob)."""
        return {TRAIN: self.handle_train, MERGE: self.handle_merge, BLOB: self.handle_blob}

    def _model(self, context: NodeContext) -> tuple[Params, str]:
        s = context.node_state
        if "model" not in s:
            assert self._params0 is not None, "Swarm.init() sets the initial model"
            s["model"], s["hash"] = tree.clone(self._params0), model_hash(self._params0)
        return s["model"], s["hash"]

    def handle_train(self, message: Message, context: NodeContext) -> Message:
        """Train from the model this peer holds and publish the update."""
        params, base = self._model(context)
        context.state.pop("swarm.blobs", None)  # last round's blobs are no longer fetched
        peer = self.peer(context.node_id, _SimBlobs(context, message.round))
        entry = peer.train(params, base, train_data(context), message.round)
        return message.reply(config={"weight": entry.examples}, metrics=entry.metrics)

    def handle_merge(self, message: Message, context: NodeContext) -> Message:
        """Close (if needed) and merge the round; record and report the merged hash."""
        params, base = self._model(context)
        peer = self.peer(context.node_id, _SimBlobs(context, message.round))
        view = peer.wait_close(message.round, base, float(message.config.get("wait_s", 0.0)))
        own = {}
        store = context.state.get("swarm.blobs", {})
        mine = view.updates.get(context.node_id)
        if mine is not None and mine[0].blob in store:
            own[context.node_id] = blob_params(store[mine[0].blob], params)
        result = peer.merge(message.round, params, base, view, own)
        context.node_state["model"], context.node_state["hash"] = result.params, result.hash
        return message.reply(config={"merged": result.hash, "failed": result.failed or ""},
                             metrics={"swarm/included": float(len(result.included)),
                                      "swarm/refused": float(len(result.refused))})

    def handle_blob(self, message: Message, context: NodeContext) -> Message:
        """Serve one of this peer's blobs by its SHA-256."""
        data = context.state.get("swarm.blobs", {}).get(str(message.config.get("sha256")))
        if data is None:
            return message.failed(f"{context.node_id} holds no blob "
                                  f"{str(message.config.get('sha256'))[:12]}")
        return message.reply(tensors={"blob": torch.frombuffer(bytearray(data),
                                                               dtype=torch.uint8)})

