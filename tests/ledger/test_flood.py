"""The flood attack on the ledger: an enrolled device writes more than 10,000 junk keys under
its own prefix — which etcd's RBAC lets it do — beside the round's entries, under names that
look like entries and under other jobs. Honest peers must still read the round (by its exact
entry keys), follow and wait for it (the watch keeps only the keys waited for), audit the
others' chains, and run a swarm; what a read costs must not grow with the flood. The etcd
tests share the session's 3-member cluster (``conftest.etcd``); the same attack on the
in-process store must give the same results (the simulation and the network agree)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

import pytest
from aetcd.rpc import rpc_pb2

from shoal import tree
from shoal.algorithms.influence import WeightCap
from shoal.algorithms.swarm import Swarm
from shoal.client import local_sgd
from shoal.credentials import RunKeys
from shoal.ledger.entry import Entry
from shoal.ledger.etcd import MAX_TXN_OPS, EtcdStore
from shoal.ledger.keys import (
    entry_key,
    parse_entry_key,
    peer_prefix,
    peers_prefix,
    registry_key,
    registry_value,
    round_prefix,
)
from shoal.ledger.ledger import Ledger
from shoal.ledger.store import MemoryStore, Record, TooManyRecords
from shoal.run import run
from shoal.sim import InProcessTransport
from tests.conftest import cross_entropy, make_tiny, sgd

FLOOD = 10_500
"""Junk keys the hostile device writes: more than an etcd read returns under one prefix."""


def _uid(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def _junk_keys(device: str, job: str, round: int, root: str = "/shoal") -> list[str]:
    """What the attacker writes under its own prefix: most of it under the round's own
    prefix (sorting before and after the real kinds, and prefixed by them), entry-shaped keys
    of later rounds, keys under other jobs, and keys too deep to be entries."""
    rp = round_prefix(device, job, round, root)
    keys = [f"{rp}zzz-{i:05d}" for i in range(FLOOD - 600)]
    keys += [f"{rp}aaa-{i:03d}" for i in range(100)]
    keys += [f"{rp}{kind}-{i:03d}" for kind in ("update", "close", "merged") for i in range(50)]
    keys += [f"{rp}Update", f"{rp}update/x", f"{rp}merged/"]
    keys += [entry_key(device, job, round + 1 + i, "update", root) for i in range(100)]
    keys += [f"{peer_prefix(device, root)}{job}/{round + 1:09d}/update"]  # not canonical
    keys += [f"{peer_prefix(device, root)}other-{i:03d}/{round:08d}/update" for i in range(100)]
    keys += [f"{rp}deep/{i:03d}/update" for i in range(96)]
    return keys


def _flood_etcd(store: EtcdStore, keys: Sequence[str], value: bytes = b"junk" * 16) -> None:
    """Put ``keys`` through ``store`` (the attacker's own connection, under etcd's RBAC), in
    transactions of MAX_TXN_OPS puts, from a few threads."""
    chunks = [keys[i:i + MAX_TXN_OPS] for i in range(0, len(keys), MAX_TXN_OPS)]

    def put(chunk: Sequence[str]) -> None:
        txn = rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(
            request_put=rpc_pb2.PutRequest(key=k.encode(), value=value)) for k in chunk])
        store._call("flood", chunk[0], lambda m, t, r: m.kv.Txn(txn, timeout=t))

    threads = [threading.Thread(target=lambda part=chunks[i::4]: [put(c) for c in part])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Counting:
    """A store that counts what the ledger's reads ask for and return: requests (a prefix or
    an exact key each), records under prefixes (the registry), records of exact keys and
    their bytes."""

    def __init__(self, store):
        self.store = store
        self.reset()

    def reset(self) -> None:
        self.asked = self.ranged = self.exact = self.exact_bytes = 0

    def ranges(self, prefixes):
        got, rev = self.store.ranges(prefixes)
        self.asked += len(prefixes)
        self.ranged += sum(len(part) for part in got)
        return got, rev

    def read(self, prefixes, keys):
        got, exact, rev = self.store.read(prefixes, keys)
        self.asked += len(prefixes) + len(keys)
        self.ranged += sum(len(part) for part in got)
        found: list[Record] = [r for r in exact if r is not None]
        self.exact += len(found)
        self.exact_bytes += sum(len(r.key) + len(r.value) for r in found)
        return got, exact, rev

    def __getattr__(self, name):
        return getattr(self.store, name)


def _entries(ledger: Ledger, signer, job: str, round: int, kinds=("update",)) -> None:
    for kind in kinds:
        ledger.append(Entry(job, round, signer.node_id, kind, 0, blob="ab" * 32, base="b" * 64,
                            examples=10.0, endpoint="127.0.0.1:1"), signer)


def test_a_flood_of_junk_keys_cannot_stop_honest_peers_reading_a_round(etcd):
    job = _uid("flood")
    names = {stem: _uid(stem) for stem in ("evil", "alice", "bob")}
    idents = {s: etcd.registrar.enroll(d, etcd.root / "devices" / d) for s, d in names.items()}
    stores = {s: etcd.cluster.store(i.tls, timeout=10.0) for s, i in idents.items()}
    signers = {s: i.signer() for s, i in idents.items()}
    evil = names["evil"]
    try:
        ledgers = {s: Ledger(st) for s, st in stores.items()}
        for s in ("alice", "bob", "evil"):  # the attacker's own entry of the round is valid
            _entries(ledgers[s], signers[s], job, 3)
        _entries(ledgers["alice"], signers["alice"], job, 2, ("update", "close", "merged"))
        t = time.monotonic()
        _flood_etcd(stores["evil"], _junk_keys(evil, job, 3))
        flood_s = time.monotonic() - t
        # The attack is real: the round's prefix of the attacker cannot be read any more...
        with pytest.raises(TooManyRecords, match="more than max_records=10000"):
            stores["bob"].ranges([round_prefix(evil, job, 3)])
        # ...but the round can, by every honest peer, with every valid entry, at one revision.
        counting = Counting(stores["bob"])
        reader = Ledger(counting)
        reader.enrolled()  # who is enrolled, as a peer knows from its last read
        counting.reset()
        t = time.monotonic()
        last, view = reader.read_rounds(job, [2, 3])
        read_s = time.monotonic() - t
        assert set(view.updates) == set(names.values())
        assert set(last.merged) == set(last.closes) == {names["alice"]}
        assert not any("zzz" in p or "aaa" in p for p in reader.problems)  # never parsed
        devices = len(view.enrolled)
        # The read's size: the registry's two prefixes plus one get per entry key (3 kinds x
        # devices x rounds), each answering at most one record: the 6 entries there are, and
        # none of the attacker's junk.
        assert counting.asked == 2 + 3 * devices * 2
        assert counting.exact == 6 and counting.exact_bytes < 6 * 2048
        print(f"\nflood: {FLOOD} keys in {flood_s:.2f} s; read of 2 rounds x {devices} "
              f"devices: {counting.asked} requests, {counting.ranged} registry records, "
              f"{counting.exact} entry records ({counting.exact_bytes} bytes), "
              f"{read_s * 1000:.0f} ms")
        # A store that returns no more records under a prefix than there are devices (the
        # registry's size) reads the round just the same.
        with EtcdStore(etcd.cluster.endpoints, idents["bob"].tls,
                       max_records=devices) as small:
            assert set(Ledger(small).read_round(job, 3).updates) == set(names.values())

        # Following the next round: junk written meanwhile neither wakes the follower for
        # nothing nor evicts alice's entry, and the stream keeps only the keys waited for.
        view4 = ledgers["bob"].read_round(job, 4)
        assert view4.updates == {}

        def attack_then_publish() -> None:
            _flood_etcd(stores["evil"], [f"{round_prefix(evil, job, 4)}j-{i:05d}"
                                         for i in range(FLOOD)]
                        + [f"{round_prefix(evil, job, 4)}merged-{i}" for i in range(50)])
            _entries(ledgers["alice"], signers["alice"], job, 4)

        # The stream is open before the flood (as in a round, where peers follow throughout).
        assert ledgers["bob"].follow(view4, 0.05) is False
        writer = threading.Thread(target=attack_then_publish)
        t = time.monotonic()
        writer.start()
        while names["alice"] not in view4.updates and time.monotonic() - t < 30:
            ledgers["bob"].follow(view4, 5.0)
        writer.join()
        assert names["alice"] in view4.updates and set(view4.updates) == {names["alice"]}
        tail = stores["bob"]._key_tails[peers_prefix()]
        t = time.monotonic()
        while tail.ignored < FLOOD and time.monotonic() - t < 10:
            time.sleep(0.05)  # the read may have seen alice's entry before the stream did
        assert tail.ignored >= FLOOD  # streamed past, dropped unread
        assert len(tail.latest) <= 3 * devices  # all the stream holds: waited-for keys
        # Waiting for the round's merged entries: the junk (some of it named merged-*) does
        # not wake the waiter.
        assert ledgers["bob"].wait(job, view4.revision, 0.3, round=4, kinds=("merged",)) is False
        # The attacker rewriting its own entry key wakes a follower once, then is ignored.
        stores["evil"].put(entry_key(evil, job, 4, "update"), b"junk")
        assert ledgers["bob"].follow(view4, 2.0) is False
        assert entry_key(evil, job, 4, "update") in view4.refused
        stores["evil"].put(entry_key(evil, job, 4, "update"), b"more junk")
        t = time.monotonic()
        assert ledgers["bob"].follow(view4, 0.3) is False
        assert time.monotonic() - t >= 0.25  # not woken by the refused key again

        # The audit checks the honest chains and reports the attacker, without stopping.
        problems = Ledger(stores["bob"]).audit(job)
        assert len(problems) == 1 and evil in problems[0] and "not audited" in problems[0]
    finally:
        for st in stores.values():
            st.close()


def _memory_swarm(store, root: str, peers: list[str], keys: RunKeys, tiny):
    for p in peers:
        store.create(registry_key(p, root), registry_value(p, keys.public(p)))
    update = local_sgd(tiny.model(), cross_entropy, epochs=1, batch_size=8, optimizer=sgd(0.1))
    swarm = Swarm(update, Ledger(store, root=root), keys.for_node, min_peers=len(peers),
                  weight_cap=WeightCap({c: 25.0 for c in peers}), seed=7, job="flooded")
    return swarm, InProcessTransport(peers, tiny.data.__getitem__, swarm.handlers())


def test_a_swarm_runs_to_the_same_model_on_flooded_etcd_as_in_memory(etcd, one_thread):
    # The simulation's swarm on the real etcd cluster (the administrator's connection plays
    # every peer, under a root of its own), with one peer's prefix flooded before the run,
    # ends with the bit-identical model of the same swarm on a clean in-process store.
    tiny = make_tiny(clients=3)
    params0 = tree.params_of(tiny.model())
    keys = RunKeys()
    root = f"/{_uid('flood-swarm')}"
    flooded = tiny.ids[1]
    junk = [k for r in (1, 2) for k in _junk_keys(flooded, "flooded", r, root)[::3]
            if parse_entry_key(k, root) is None]  # its own entry keys it leaves to itself
    in_job = [k for k in junk if k.startswith(f"{peer_prefix(flooded, root)}flooded/")]
    with etcd.cluster.store(timeout=10.0) as store:
        _flood_etcd(store, junk)
        swarm, transport = _memory_swarm(store, root, tiny.ids, keys, tiny)
        got = run(swarm, transport, rounds=2, params=params0)
        ledger = Ledger(store, root=root)
        problems = ledger.audit("flooded")
        assert problems == [f"{flooded!r} wrote {len(in_job)} keys under "
                            f"'{peer_prefix(flooded, root)}flooded/' that are not entry keys; "
                            "ignored"]
    clean, transport = _memory_swarm(MemoryStore(), root, tiny.ids, keys, tiny)
    want = run(clean, transport, rounds=2, params=params0)
    assert got.state.hash == want.state.hash
    assert got.history[-1]["round/replied"] == 3.0


def test_the_in_process_store_meets_the_flood_as_etcd_does():
    # The same attack on MemoryStore: the prefix read is refused past max_records, the round
    # is read by its exact keys, the follower is not woken by junk, the audit goes on.
    store = MemoryStore()
    keys = RunKeys()
    peers = ["alice", "bob", "evil"]
    for p in peers:
        store.create(registry_key(p), registry_value(p, keys.public(p)))
    ledger = Ledger(store)
    for p in peers:
        _entries(ledger, keys.for_node(p), "job", 3)
    for k in _junk_keys("evil", "job", 3):
        store.put(k, b"junk")
    with pytest.raises(TooManyRecords, match="more than max_records=10000"):
        store.ranges([round_prefix("evil", "job", 3)])
    counting = Counting(store)
    reader = Ledger(counting)
    reader.enrolled()
    counting.reset()
    view = reader.read_round("job", 3)
    assert set(view.updates) == set(peers)
    assert counting.asked == 2 + 3 * 3 and counting.exact == 3 and counting.ranged == 3
    view4 = reader.read_round("job", 4)
    for i in range(100):
        store.put(f"{round_prefix('evil', 'job', 4)}merged-{i}", b"junk")
    assert reader.follow(view4, 0.05) is False
    assert reader.wait("job", view4.revision, 0.05, round=4) is False
    problems = Ledger(store).audit("job")
    assert len(problems) == 1 and "'evil' has more than 10000 keys" in problems[0]


def test_entry_keys_are_exactly_what_entry_key_writes():
    assert parse_entry_key(entry_key("d", "j", 3, "close")) == ("d", "j", 3, "close")
    assert parse_entry_key(entry_key("d", "j", 123_456_789, "merged")) == (
        "d", "j", 123_456_789, "merged")
    for junk in ("/shoal/peers/d/j/00000003/zzz", "/shoal/peers/d/j/00000003/update-1",
                 "/shoal/peers/d/j/0000003/update", "/shoal/peers/d/j/000000003/update",
                 "/shoal/peers/d/j/0000000x/update", "/shoal/peers/d/j/00000003/update/",
                 "/shoal/peers/d/00000003/update", "/shoal/peers//j/00000003/update",
                 "/other/peers/d/j/00000003/update",
                 "/shoal/peers/d/j/\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff13/update"):
        assert parse_entry_key(junk) is None, junk


def test_a_key_that_is_not_utf8_is_junk_not_a_crash(etcd):
    """etcd keys are bytes: a device's key that does not decode is counted, not fatal."""
    job = _uid("bytes")
    evil, honest = _uid("evil"), _uid("alice")
    idents = {d: etcd.registrar.enroll(d, etcd.root / "devices" / d) for d in (evil, honest)}
    stores = {d: etcd.cluster.store(i.tls, timeout=10.0) for d, i in idents.items()}
    try:
        _entries(Ledger(stores[honest]), idents[honest].signer(), job, 1)
        bad = f"{peer_prefix(evil)}{job}/".encode() + b"\xff\xfe/00000001/update"
        txn = rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(
            request_put=rpc_pb2.PutRequest(key=bad, value=b"junk"))])
        stores[evil]._call("put", "bad", lambda m, t, r: m.kv.Txn(txn, timeout=t))
        ledger = Ledger(stores[honest])
        assert set(ledger.read_round(job, 1).updates) == {honest}
        problems = ledger.audit(job)
        assert len(problems) == 1 and evil in problems[0] and "1 key" in problems[0], problems
    finally:
        for st in stores.values():
            st.close()
