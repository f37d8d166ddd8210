"""Secure aggregation against active attackers: a coordinator that lies to clients, swaps keys or
splits the survivors' views, and clients that send bad shares. Each attack must fail, the honest
clients must say why, and a round that cannot finish fails cleanly while the run goes on."""

from __future__ import annotations

import dataclasses

import pytest

from shoal import tree
from shoal.client import local_sgd
from shoal.message import Message
from shoal.run import run
from shoal.secagg import SecureFedAvg, secure_aggregation
from shoal.secagg.crypto import public_bytes
from shoal.secagg.protocol import CONSISTENCY, SHARE_KEYS, UNMASK, u8
from shoal.secagg.session import secure_sum
from shoal.secagg.shamir import PRIME, SHARE_BYTES
from shoal.sim import InProcessTransport

from ..conftest import cross_entropy, make_tiny, sgd
from ._helpers import Coordinator, D, federation


def _neighbours_of(victim: str, replies: list[Message]) -> list[str]:
    """The victim's neighbours, from the share_keys replies addressed to it (ct/victim)."""
    return sorted(r.src for r in replies if r.kind == SHARE_KEYS and f"ct/{victim}" in r.tensors)


def _shares_of(victim: str, replies: list[Message]) -> tuple[int, int]:
    """How many shares of the victim's self-mask seed (b) and key (s) the coordinator got."""
    b = sum(1 for r in replies if r.kind == UNMASK and f"b/{victim}" in r.tensors)
    s = sum(1 for r in replies if r.kind == UNMASK and f"s/{victim}" in r.tensors)
    return b, s


def test_telling_half_the_neighbours_that_a_survivor_dropped_is_refused():
    """The attack of the issue: half of the victim's neighbours are told it dropped (so they
    would send shares of its key) while the others send shares of its self-mask seed."""
    ids, honest = federation(30, seed=2)
    victim = ids[0]
    told: set[str] = set()

    def lie(m: Message) -> Message:
        if m.kind == UNMASK and m.dst in told:
            return dataclasses.replace(m, config={**m.config, "dropped": [victim]})
        return m

    coord = Coordinator(honest.inner, lie)
    # A first session to learn the graph (public: it derives from the seed and the session).
    probe = Coordinator(honest.inner, lambda m: m)
    secure_sum(probe, ids, round=1, session="s", task="sum", length=D, seed=2)
    neighbours = _neighbours_of(victim, probe.replies)
    told.update(neighbours[: len(neighbours) // 2])
    secure_sum(coord, ids, round=1, session="s", task="sum", length=D, seed=2)
    b, s = _shares_of(victim, coord.replies)
    assert s == 0  # no neighbour revealed a share of the victim's key
    refused = {r.src: r.error for r in coord.replies if r.kind == UNMASK and r.error}
    assert set(refused) == told
    for who, why in refused.items():
        assert why == (f"SecAggError: secagg.unmask: client {who!r} refuses: the coordinator "
                       f"says {[victim]!r} dropped out, but the survivor set the clients signed "
                       "says otherwise; revealing both shares of a client would unmask its "
                       "input.")


def test_showing_neighbours_different_survivor_sets_never_yields_both_secrets():
    """A subtler coordinator splits the victim's neighbours at the consistency step: half see
    the victim among the survivors (and would send its seed's shares), half do not (and would
    send its key's shares); each sees only signatures over its own view."""
    ids, honest = federation(30, seed=6)
    victim = ids[3]
    probe = Coordinator(honest.inner, lambda m: m)
    secure_sum(probe, ids, round=1, session="s", task="sum", length=D, seed=6)
    neighbours = _neighbours_of(victim, probe.replies)
    b_side = set(neighbours[: len(neighbours) // 2])  # shown the victim as dropped
    views: dict[str, list[str]] = {}

    def split(m: Message) -> Message:
        if m.kind == CONSISTENCY:
            full = m.config["survivors"]
            view = [u for u in full if u != victim] if m.dst in b_side else full
            views[m.dst] = view
            return dataclasses.replace(m, config={**m.config, "survivors": view})
        if m.kind == UNMASK:
            view = views[m.dst]
            sigs = {k: v for k, v in m.tensors.items()
                    if views.get(k.removeprefix("sig/")) == view}
            return Message(m.kind, m.src, m.dst, m.round, sigs, {**m.config, "survivors": view})
        return m

    coord = Coordinator(honest.inner, split)
    res = secure_sum(coord, ids, round=1, session="s", task="sum", length=D, seed=6)
    b, s = _shares_of(victim, coord.replies)
    t = res.threshold
    assert t > len(neighbours) / 2
    assert not (b >= t and s >= t)  # never both of the victim's secrets
    assert s < t
    refused = {r.src: r.error for r in coord.replies if r.kind == UNMASK and r.error}
    assert b_side <= set(refused)  # those shown the smaller set say why they reveal nothing
    for who in b_side:
        assert refused[who].startswith(f"SecAggError: secagg.unmask: client {who!r} refuses: "
                                       "only ")
        assert refused[who].endswith("of its neighbours signed the survivor set, fewer than "
                                     f"the threshold {t}; it reveals no shares.")


def test_a_threshold_at_or_below_half_the_neighbours_is_refused_by_the_clients():
    ids, honest = federation(20, seed=1)

    def weaken(m: Message) -> Message:
        if m.kind == SHARE_KEYS:
            k = len(m.config["neighbours"])
            return dataclasses.replace(m, config={**m.config, "threshold": k // 2})
        return m

    coord = Coordinator(honest.inner, weaken)
    res = secure_sum(coord, ids, round=1, session="s", task="sum", length=D, seed=1)
    assert res.total is None
    errors = [r.error for r in coord.replies if r.kind == SHARE_KEYS]
    assert len(errors) == 20  # every client refuses
    for why in errors:
        assert why.startswith("SecAggError: secagg.share_keys: client ")
        assert why.endswith("refuses threshold t=7 for 15 neighbours: below 8 (more than half), "
                            "a coordinator that tells some neighbours a client survived and "
                            "others that it dropped could collect both of its shares.")


def test_a_coordinator_that_swaps_in_its_own_keys_is_refused():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    ids, honest = federation(12, seed=3)
    mine = u8(public_bytes(X25519PrivateKey.generate()))
    target: list[str] = []

    def swap(m: Message) -> Message:
        if m.kind == SHARE_KEYS and not target:
            target.append(m.dst)
            v = m.config["neighbours"][0]
            target.append(v)
            return m.with_tensors({**m.tensors, f"pk_s/{v}": mine})
        return m

    coord = Coordinator(honest.inner, swap)
    secure_sum(coord, ids, round=1, session="s", task="sum", length=D, seed=3)
    (why,) = [r.error for r in coord.replies if r.kind == SHARE_KEYS and r.src == target[0]]
    assert why == (f"SecAggError: secagg.share_keys: client {target[0]!r} refuses the keys "
                   f"given for its neighbour {target[1]!r}: the signature of {target[1]!r} does "
                   "not verify; the coordinator may have swapped them.")


# -- clients that send bad shares ---------------------------------------------------------------

def _tamper(who: str, how: str):
    """A mod: client ``who`` corrupts the first self-mask-seed share in its unmask reply."""
    def mod(message, context, handler):
        reply = handler(message, context)
        if message.kind != UNMASK or context.node_id != who or reply.error:
            return reply
        name = next(k for k in sorted(reply.tensors) if k.startswith("b/"))
        data = bytearray(reply.tensors[name].numpy().tobytes())
        if how == "flip":
            data[-1] ^= 0x01
        else:  # crafted: a chosen offset added to the share, so the seed rebuilt shifts
            y = (int.from_bytes(data[2:], "big") + 12345) % PRIME
            data[2:] = y.to_bytes(SHARE_BYTES, "big")
        return reply.with_tensors({**reply.tensors, name: u8(bytes(data))})
    return mod


class Reports:
    """A callback keeping each round's report (dropped clients with their reasons)."""

    def __init__(self) -> None:
        self.reports = []

    def after_round(self, ctx, report):
        self.reports.append(report)


def _secure_run(mods=(), rounds=3, threshold=0.51, clients=8):
    tiny = make_tiny(clients=clients)
    model = tiny.model()
    algo = SecureFedAvg(local_sgd(model, cross_entropy, optimizer=sgd(0.1)), seed=4,
                        secagg=secure_aggregation(clip=2.0, threshold=threshold))
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, algo.handlers(), mods=mods)
    reports = Reports()
    result = run(algo, transport, rounds=rounds, params=tree.params_of(model),
                 callbacks=[reports])
    return result, tiny.ids, reports.reports


@pytest.mark.parametrize("how", ["flip", "crafted"])
def test_a_bad_share_is_caught_its_sender_named_and_the_sum_stays_exact(how):
    honest, ids, _ = _secure_run()
    bad, _, reports = _secure_run(mods=[_tamper(ids[2], how)])
    assert tree.equal(honest.state.params, bad.state.params)  # the bad share was left out
    for h, report in zip(bad.history, reports, strict=True):
        assert "round/failed" not in h
        assert h["round/replied"] == len(ids)  # its input still counts
        assert report.dropped[ids[2]].startswith("unmask: sent a share of ")
        assert report.dropped[ids[2]].endswith("'s self-mask seed that does not match the seed "
                                               "it committed to (a corrupted or forged share)")


def test_a_round_whose_secret_cannot_be_rebuilt_fails_cleanly_and_the_run_goes_on():
    """With t = k every share is needed: one bad share leaves no way to rebuild the seed."""
    flaky = {"on": True}

    def once(message, context, handler):
        if flaky["on"] and message.round == 1:
            return _tamper("client-2", "flip")(message, context, handler)
        return handler(message, context)

    res, ids, reports = _secure_run(mods=[once], threshold=1.0, clients=5)
    clean, _, _ = _secure_run(threshold=1.0, clients=5, rounds=1)
    first, later = res.history[0], res.history[1:]
    assert first["round/failed"] == 1.0
    assert reports[0].failed.startswith("secure aggregation cannot unmask ")
    assert "suspects: " in reports[0].failed and reports[0].failed.endswith(
        "no partial result is used.")
    assert all("round/failed" not in h for h in later)  # the next rounds run as usual
    assert not tree.equal(clean.state.params, res.state.params)
