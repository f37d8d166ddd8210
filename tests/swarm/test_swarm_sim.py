"""Swarm learning in simulation: the FedAvg oracle, and what the ledger refuses or detects."""

from __future__ import annotations

import logging

import pytest
import torch

from shoal import tree
from shoal.aggregate import coordinate_median, geometric_median, trimmed_mean
from shoal.algorithms.fedavg import FedAvg
from shoal.algorithms.influence import WeightCap
from shoal.algorithms.swarm import Swarm, model_hash
from shoal.client import local_sgd
from shoal.credentials import RunKeys
from shoal.ledger.entry import Entry, entry_hash
from shoal.ledger.keys import entry_key, registry_key, registry_value, revoked_key
from shoal.ledger.ledger import Ledger
from shoal.ledger.store import MemoryStore
from shoal.run import run
from shoal.sim import InProcessTransport
from tests.conftest import cross_entropy, make_tiny, sgd


def _swarm(tiny, *, reducer=None, peers=None, min_peers=None, keys=None, store=None):
    peers = peers or tiny.ids
    keys = keys or RunKeys()
    store = store if store is not None else MemoryStore()
    for p in peers:
        store.create(registry_key(p), registry_value(p, keys.public(p)))
    update = local_sgd(tiny.model(), cross_entropy, epochs=1, batch_size=8, optimizer=sgd(0.1))
    caps = WeightCap({c: 25.0 for c in peers})
    swarm = Swarm(update, Ledger(store), keys.for_node, reducer=reducer,
                  min_peers=min_peers or len(peers), weight_cap=caps, seed=7)
    transport = InProcessTransport(peers, tiny.data.__getitem__, swarm.handlers())
    return swarm, transport, store, keys


def test_swarm_with_mean_merging_equals_fedavg_bit_for_bit():
    tiny = make_tiny(clients=5)
    params0 = tree.params_of(tiny.model())
    swarm, transport, _, _ = _swarm(tiny)
    got = run(swarm, transport, rounds=3, params=params0)
    update = local_sgd(tiny.model(), cross_entropy, epochs=1, batch_size=8, optimizer=sgd(0.1))
    fedavg = FedAvg(update, seed=7, weight_cap=WeightCap({c: 25.0 for c in tiny.ids}))
    want = run(fedavg, InProcessTransport(tiny.ids, tiny.data.__getitem__, fedavg.handlers()),
               rounds=3, params=params0)
    a, b = swarm.params(got.state), fedavg.params(want.state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not tree.equal(a, params0)
    # every peer holds the very model the observer assembled, and recorded its hash
    for p in tiny.ids:
        held = transport.context(p, round=4).node_state
        assert held["hash"] == model_hash(a)
    assert got.history[-1]["swarm/merged_hash_mismatches"] == 0.0
    assert swarm.ledger.audit("sim") == []


@pytest.mark.parametrize("reducer", [coordinate_median(), trimmed_mean(0.2), geometric_median()])
def test_robust_merging_gives_every_peer_the_same_model(reducer):
    tiny = make_tiny(clients=5)
    swarm, transport, _, _ = _swarm(tiny, reducer=reducer)
    res = run(swarm, transport, rounds=2, params=tree.params_of(tiny.model()))
    hashes = {transport.context(p, round=3).node_state["hash"] for p in tiny.ids}
    assert hashes == {res.state.hash}
    assert res.history[-1]["round/replied"] == 5.0


def test_an_unenrolled_device_entries_are_refused(caplog):
    tiny = make_tiny(clients=3)
    swarm, transport, store, keys = _swarm(tiny)
    intruder = RunKeys().for_node("mallory")
    key = entry_key("mallory", "sim", 1, "update")
    e = Entry("sim", 1, "mallory", "update", 1, blob="00" * 32, base="x")
    from shoal.ledger.entry import sign_entry
    store.create(key, sign_entry(e, intruder).encode())
    with caplog.at_level(logging.WARNING):
        view = swarm.ledger.read_round("sim", 1, ["mallory", *tiny.ids])
    assert "mallory" not in view.updates
    assert "device 'mallory' is not enrolled" in caplog.text


def test_forged_signature_and_foreign_prefix_are_refused(caplog):
    tiny = make_tiny(clients=3)
    swarm, transport, store, keys = _swarm(tiny)
    from shoal.ledger.entry import sign_entry
    # client-1 writes (in the in-process store, which has no RBAC) under client-0's prefix
    e = Entry("sim", 1, "client-1", "update", 1, blob="00" * 32, base="x")
    store.create(entry_key("client-0", "sim", 1, "update"),
                 sign_entry(e, keys.for_node("client-1")).encode())
    # and an entry claiming to be client-2's, signed with another key
    forged = Entry("sim", 1, "client-2", "update", 1, blob="00" * 32, base="x")
    store.create(entry_key("client-2", "sim", 1, "update"),
                 sign_entry(forged, RunKeys().for_node("client-2")).encode())
    with caplog.at_level(logging.WARNING):
        view = swarm.ledger.read_round("sim", 1)
    assert view.updates == {}
    assert "which is not its key" in caplog.text
    assert "signature of 'client-2'" in caplog.text and "forged or altered" in caplog.text


def test_a_revoked_device_is_refused_after_revocation(caplog):
    tiny = make_tiny(clients=3)
    swarm, transport, store, keys = _swarm(tiny, min_peers=2)
    run(swarm, transport, rounds=1, params=tree.params_of(tiny.model()))
    store.create(revoked_key("client-2"), b'{"device": "client-2", "reason": "left"}')
    with caplog.at_level(logging.WARNING):
        res = run(swarm, transport, rounds=2, params=None, state=swarm.init(
            tree.params_of(tiny.model())), start_round=2)
    assert "was revoked" in caplog.text
    assert res.history[-1]["round/replied"] == 2.0
    assert swarm.ledger.active() == ["client-0", "client-1"]


def test_a_blob_whose_hash_differs_from_its_entry_is_refused(caplog):
    tiny = make_tiny(clients=3)
    swarm, transport, _, _ = _swarm(tiny, min_peers=2)
    real = swarm.handle_blob

    def lying(message, context):  # client-1 serves other bytes than it signed
        reply = real(message, context)
        if context.node_id == "client-1" and not reply.error:
            blob = reply.tensors["blob"].clone()
            blob[-1] ^= 1
            return message.reply(tensors={"blob": blob})
        return reply
    transport.handlers["swarm.blob"] = lying
    with caplog.at_level(logging.WARNING):
        res = run(swarm, transport, rounds=1, params=tree.params_of(tiny.model()))
    assert "SHA-256" in caplog.text and "signed entry names; refused" in caplog.text
    # the peer that closed the round could not check client-1's blob, so its close leaves
    # the update out, and every peer (the liar too) merges the same two
    assert res.history[-1]["round/replied"] == 2.0
    assert res.history[-1]["swarm/merged_hash_mismatches"] == 0.0
    close = swarm.ledger.read_round("sim", 1).closes["client-0"][0]
    assert close.included == ("client-0", "client-2")


def test_an_entry_rewritten_by_a_store_administrator_is_detected(caplog):
    tiny = make_tiny(clients=3)
    swarm, transport, store, keys = _swarm(tiny)
    run(swarm, transport, rounds=2, params=tree.params_of(tiny.model()))
    ledger = swarm.ledger
    assert ledger.audit("sim") == []
    key = entry_key("client-1", "sim", 1, "update")
    (rec,), _ = store.ranges([key])
    e = Entry.decode(rec[0].value) if isinstance(rec, list) else Entry.decode(rec.value)
    # 1. overwritten in place with different content: the signature no longer verifies
    import dataclasses
    store.put(key, dataclasses.replace(e, examples=1e9).encode())
    problems = Ledger(store).audit("sim")
    assert any("does not verify" in p for p in problems)
    # 2. deleted and written again with a validly signed but different entry (the admin has
    # no key; replaying the device's own round-2 entry breaks the chain)
    store.delete(key)
    (r2,), _ = store.ranges([entry_key("client-1", "sim", 2, "update")])
    store.create(key, r2[0].value)
    problems = Ledger(store).audit("sim")
    assert any("does not match its key" in p or "not its key's" in p or "chain" in p
               for p in problems), problems
    # 3. the ledger that read the entry before sees the rewrite when it reads again
    with caplog.at_level(logging.WARNING):
        view = ledger.read_round("sim", 1)
    assert "client-1" not in view.updates
    assert "rewritten after it was written" in caplog.text or "not its key" in caplog.text


def test_a_peer_whose_merged_model_differs_is_flagged(caplog):
    tiny = make_tiny(clients=3)
    swarm, transport, store, keys = _swarm(tiny)
    real = swarm.handle_merge

    def diverging(message, context):
        reply = real(message, context)
        if context.node_id == "client-2":  # it holds (and would record) another model
            return message.reply(config={"merged": "f" * 64}, metrics=reply.metrics)
        return reply
    transport.handlers["swarm.merge"] = diverging
    with caplog.at_level(logging.WARNING):
        res = run(swarm, transport, rounds=1, params=tree.params_of(tiny.model()))
    assert res.history[-1]["swarm/merged_hash_mismatches"] == 1.0
    assert "client-2's merged model" in caplog.text and "differs" in caplog.text


def test_entry_hash_chain_links_each_device_entries():
    tiny = make_tiny(clients=2)
    swarm, transport, store, _ = _swarm(tiny)
    run(swarm, transport, rounds=2, params=tree.params_of(tiny.model()))
    (recs,), _ = store.ranges(["/shoal/peers/client-0/sim/"])
    chain = sorted((Entry.decode(r.value) for r in recs), key=lambda e: e.seq)
    assert [e.seq for e in chain] == list(range(1, len(chain) + 1))
    assert chain[0].prev == ""
    assert all(b.prev == entry_hash(a) for a, b in zip(chain, chain[1:], strict=False))
