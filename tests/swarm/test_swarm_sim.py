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
    (records,), _ = store.ranges([key])
    e = Entry.decode(records[0].value)
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


def test_a_replaced_registry_key_is_detected_and_the_first_key_kept(caplog):
    # The store's administrator swaps a device's public key for one of its own, then signs an
    # entry in the device's name with it: the ledger pinned the key it first read.
    tiny = make_tiny(clients=2)
    swarm, transport, store, keys = _swarm(tiny)
    run(swarm, transport, rounds=1, params=tree.params_of(tiny.model()))
    from shoal.ledger.entry import sign_entry
    insider = RunKeys().for_node("client-1")
    store.delete(registry_key("client-1"))
    store.create(registry_key("client-1"), registry_value("client-1", insider.credential()))
    forged = Entry("sim", 2, "client-1", "update", 1, blob="00" * 32, base="x")
    store.create(entry_key("client-1", "sim", 2, "update"), sign_entry(forged, insider).encode())
    with caplog.at_level(logging.WARNING):
        view = swarm.ledger.read_round("sim", 2)
    assert "registry record of 'client-1' was replaced" in caplog.text
    assert "client-1" not in view.updates


def test_a_peer_claiming_a_huge_weight_is_capped():
    tiny = make_tiny(clients=3)
    params0 = tree.params_of(tiny.model())

    def run_with(claim: float, cap: bool):
        swarm, transport, _, _ = _swarm(tiny)
        if not cap:
            swarm.weight_cap = None
        real = swarm.client_update

        def boastful(params, data, info):
            r = real(params, data, info)
            return type(r)(r.update, claim, r.metrics) if info.client_id == "client-2" else r
        swarm.client_update = boastful
        return run(swarm, transport, rounds=1, params=params0).state.params

    honest = run_with(25.0, cap=True)  # client-2 trains on 25 examples: its true weight
    assert tree.equal(run_with(1e30, cap=True), honest)  # capped at the 25 assigned
    uncapped = run_with(1e30, cap=False)  # without the cap, client-2's update is the model
    assert tree.norm(tree.sub(uncapped, honest)) > 1e-3


def test_swarm_runs_from_the_config_with_dp_sgd_on_every_peer(tmp_path):
    import shoal
    config = shoal.load_config(None, [
        "paradigm=swarm", "task.name=heart", "federated.rounds=2", "baseline=false",
        "federated.clients_per_round=4", "privacy.mode=sample", "privacy.noise_multiplier=1.0",
        "privacy.clip_norm=1.0"])
    (res,) = shoal.run_experiment(config, tmp_path / "run")
    assert res.paradigm == "swarm" and res.rounds == 2
    assert res.privacy["epsilon"] > 0 and res.privacy["noise"] != "reproducible"
    import json
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["results"][0]["paradigm"] == "swarm"


@pytest.mark.parametrize(("override", "message"), [
    ("secagg.enabled=true", "config field 'secagg.enabled': paradigm = \"swarm\" merges each "
     "peer's update by its hash on the ledger; secure aggregation needs a coordinator."),
    ("federated.reducer=median", "config field 'federated.reducer': paradigm = \"swarm\" does "
     "not implement it, so federated.reducer = 'median' would not be applied; set swarm.merge "
     "instead."),
    ("privacy.mode=user", "config field 'privacy.mode': paradigm = \"swarm\" has no aggregator "
     "to add \"user\" noise"),
    ("federated.clients_per_round=2", "config field 'federated.clients_per_round': paradigm = "
     "\"swarm\" has every one of the 4 peers take part in every round"),
])
def test_settings_swarm_does_not_implement_are_errors(override, message):
    import shoal
    from shoal.validate_config import config_problems
    config = shoal.load_config(None, ["paradigm=swarm", "task.name=heart", override])
    assert any(message in p for p in config_problems(config)), config_problems(config)


def test_the_ca_refuses_reserved_ids(tmp_path):
    from shoal.errors import ConfigError
    from shoal.net import CertificateAuthority
    ca = CertificateAuthority.init(tmp_path / "ca")
    for reserved in ("root", "registrar", "coordinator", "etcd-member-0"):
        with pytest.raises(ConfigError, match=f"CA: '{reserved}' is reserved"):
            ca.enroll(reserved, tmp_path / "nodes")


def test_a_resumed_swarm_simulation_ends_bit_identical(tmp_path):
    # The peers' models are node state (checkpointed); the resumed run starts a new
    # in-process ledger and continues each peer's chain from there.
    from safetensors.torch import load_file

    import shoal
    base = ["paradigm=swarm", "task.name=heart", "baseline=false",
            "federated.clients_per_round=4"]
    shoal.run_experiment(shoal.load_config(None, [*base, "federated.rounds=4"]), tmp_path / "a")
    shoal.run_experiment(shoal.load_config(None, [*base, "federated.rounds=2"]), tmp_path / "b")
    shoal.run_experiment(shoal.load_config(None, [*base, "federated.rounds=4"]), tmp_path / "b",
                         resume=True)
    a, b = (load_file(str(tmp_path / x / "swarm" / "model.safetensors")) for x in "ab")
    assert model_hash(a) == model_hash(b)
