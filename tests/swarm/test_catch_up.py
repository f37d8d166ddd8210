"""Catching up (a peer that starts or restarts mid-job) against a hostile enrolled peer: one
peer's validly signed merged entries for rounds the swarm has not reached, or its vote in a
tie, never make another peer adopt its model."""

from __future__ import annotations

from shoal.credentials import RunKeys
from shoal.ledger.entry import Entry
from shoal.ledger.keys import registry_key, registry_value
from shoal.ledger.ledger import Ledger
from shoal.ledger.store import MemoryStore
from shoal.net.swarm import _majority, newest_agreed

HONEST, EVIL = "1" * 64, "e" * 64
PEERS = ["a-evil", "b", "c", "d"]  # the attacker's name sorts first: ties would go its way


def _ledger() -> tuple[Ledger, RunKeys]:
    keys, store = RunKeys(), MemoryStore()
    for p in PEERS:
        store.create(registry_key(p), registry_value(p, keys.public(p)))
    return Ledger(store), keys


def _merged(ledger: Ledger, keys: RunKeys, device: str, round: int, blob: str) -> None:
    ledger.append(Entry("job", round, device, "merged", 0, blob=blob,
                        included=("b", "c", "d")), keys.for_node(device))


def test_a_lone_peers_merged_entries_for_rounds_ahead_are_outvoted():
    ledger, keys = _ledger()
    for r in (1, 2):  # the swarm merged rounds 1 and 2; the attacker agreed, to look honest
        for d in PEERS:
            _merged(ledger, keys, d, r, f"{r}" * 64)
    for r in range(3, 9):  # then it records "merged" models of its own for rounds 3 to 8
        _merged(ledger, keys, "a-evil", r, EVIL)
    r, entry = newest_agreed(ledger, "job", 8, quorum=2)
    assert (r, entry.blob) == (2, "2" * 64)
    # with min_peers = 1 a single peer's word is what the swarm agreed to accept
    assert newest_agreed(ledger, "job", 8, quorum=1)[1].blob == EVIL


def test_an_honest_round_ahead_is_taken_once_the_quorum_agrees():
    ledger, keys = _ledger()
    _merged(ledger, keys, "a-evil", 1, EVIL)
    _merged(ledger, keys, "b", 1, HONEST)
    assert newest_agreed(ledger, "job", 4, quorum=2) == (0, None)
    _merged(ledger, keys, "c", 1, HONEST)
    r, entry = newest_agreed(ledger, "job", 4, quorum=2)
    assert (r, entry.blob) == (1, HONEST)


def test_in_a_tie_a_peer_keeps_its_own_model():
    ledger, keys = _ledger()
    _merged(ledger, keys, "a-evil", 1, EVIL)
    _merged(ledger, keys, "b", 1, HONEST)
    merged = ledger.read_round("job", 1).merged
    assert _majority(merged, own=HONEST).blob == HONEST  # b is not outvoted by one peer
    assert _majority(merged).blob == EVIL  # a peer with no model of its own: sorted order
    _merged(ledger, keys, "c", 1, EVIL)  # a real majority still wins
    assert _majority(ledger.read_round("job", 1).merged, own=HONEST).blob == EVIL
