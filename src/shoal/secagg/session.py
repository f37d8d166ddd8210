"""The coordinator's side of one secure-aggregation session: :func:`secure_sum`.

It runs the five steps of :mod:`shoal.secagg.protocol` over any transport: collects the signed
public keys, deals out the neighbour graph, sums the masked inputs as they arrive (one at a
time), asks the survivors to sign who survived, and rebuilds what it needs to remove the masks —
each survivor's self-mask seed b from t shares, checked against the seed's commitment, and each
dropped client's s key from t shares, checked against its public key. A share that does not fit
(a flipped bit, a crafted share) is found by trying other t-subsets of the shares (with more
than t shares at hand) and its sender is named. Whatever goes wrong — too few survivors, a
client that refuses, a secret that cannot be rebuilt — the session ends with ``failed`` set and
no result; it never raises, so one faulty or malicious client cannot crash a run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..message import COORDINATOR, Message
from ..transport import Transport
from ..tree import Params
from ..validation import reply_problem
from . import crypto
from .crypto import KEY_BYTES, load_private, public_of
from .errors import SecAggError
from .graph import default_neighbours, neighbour_graph, shamir_threshold
from .protocol import (
    ADVERTISE,
    CONSISTENCY,
    CT_PREFIX,
    MASKED_INPUT,
    SHARE_KEYS,
    UNMASK,
    commitment,
    pair_mask_key,
    raw,
)
from .quantize import levels_for
from .shamir import SHARE_BYTES, recover

__all__ = ["CT_BYTES", "SecureSum", "secure_sum"]

CT_BYTES = 12 + 2 + 2 * SHARE_BYTES + 16
"""Bytes of one encrypted pair of shares: nonce, x, share of s, share of b, GCM tag."""

_MAX_CREDENTIAL = 8192
"""The largest signature or credential (a certificate) a client may send, in bytes."""


@dataclass
class SecureSum:
    """The outcome of one session.

    ``total`` is the exact sum, modulo 2^32, of the contributors' quantized inputs (``None``
    when ``failed`` says why there is no result); ``dropped`` maps each client that fell out to
    the step and reason, and each client caught sending a bad share to what it did (its input
    may still count); ``timings`` holds the coordinator's own compute time per phase.
    """

    total: np.ndarray | None
    contributors: list[str]
    dropped: dict[str, str]
    failed: str | None
    neighbours: int = 0
    threshold: int = 0
    levels: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def _template(names: Iterable[str], n: int, dtype: torch.dtype = torch.uint8) -> Params:
    """What a reply of one step must hold: these names, each a 1-D tensor of ``n`` ``dtype``."""
    return {name: torch.empty(n, dtype=dtype) for name in names}


def _bytes_problem(reply: Message, names: Iterable[str]) -> str | None:
    """Why the variable-length byte tensors ``names`` of ``reply`` are unusable, or None."""
    for name in names:
        t = reply.tensors.get(name)
        if t is None or t.dtype != torch.uint8 or t.dim() != 1 \
                or not 0 < t.shape[0] <= _MAX_CREDENTIAL:
            return (f"{reply.kind} reply tensor {name!r} must be 1 to {_MAX_CREDENTIAL} bytes "
                    "(uint8)")
    return None


def secure_sum(transport: Transport, clients: Sequence[str], *, round: int, session: str,
               task: str, length: int, payload: Params | None = None,
               config: Mapping[str, Any] | None = None, neighbours: int | None = None,
               threshold: float = 0.51, seed: int = 0, timeout: float | None = None,
               min_contributors: int = 1) -> SecureSum:
    """Run one SecAgg+ session over ``clients``: the exact sum of their quantized inputs.

    ``task`` names the clients' :data:`~shoal.secagg.protocol.InputFn`, whose blocks must total
    ``length`` values; ``payload`` (e.g. the global params) and ``config`` go to the clients
    with ``secagg.masked_input``. ``neighbours`` is the degree of the graph (``None``:
    :func:`~shoal.secagg.graph.default_neighbours`), ``threshold`` the fraction of them needed
    to unmask a client (above 1/2). The session fails (``failed`` set, no ``total``) when fewer
    than ``min_contributors`` inputs arrive, a neighbourhood has fewer than t survivors, or a
    secret cannot be rebuilt; it never raises for what clients send.
    """
    dropped: dict[str, str] = {}
    timings: dict[str, float] = {}
    state = {"k": 0, "t": 0, "levels": 0}

    def result(failed: str | None, total: np.ndarray | None = None,
               contributors: Sequence[str] = ()) -> SecureSum:
        return SecureSum(total, list(contributors), dropped, failed, state["k"], state["t"],
                         state["levels"], timings)

    try:
        return _session(transport, list(clients), round, session, task, length, payload,
                        dict(config or {}), neighbours, threshold, seed, timeout,
                        min_contributors, dropped, timings, state, result)
    except (SecAggError, ValueError) as e:  # a secret or a reply that cannot be used
        return result(f"secure aggregation failed: {e}; no partial result is used.")


def _session(transport: Transport, clients: list[str], round: int, session: str, task: str,
             length: int, payload: Params | None, config: dict[str, Any],
             neighbours: int | None, threshold: float, seed: int, timeout: float | None,
             min_contributors: int, dropped: dict[str, str], timings: dict[str, float],
             state: dict[str, int], result: Callable[..., SecureSum]) -> SecureSum:
    def ask(kind: str, messages: list[Message], template: Callable[[Message], Params],
            variable: Sequence[str] = ()) -> Iterable[tuple[Message, Message]]:
        for req, rep in zip(messages, transport.stream(messages, timeout), strict=True):
            fixed = {k: v for k, v in template(req).items()}
            reason = reply_problem(
                req, rep.with_tensors({k: v for k, v in rep.tensors.items()
                                       if k not in variable}) if variable else rep,
                template=fixed, what=f"{kind} reply")
            if reason is None and variable:
                reason = _bytes_problem(rep, variable)
            if reason is not None:
                dropped[req.dst] = f"{kind}: {reason}"
                continue
            yield req, rep

    base = {"session": session}
    # 1. advertise signed keys
    msgs = [Message(ADVERTISE, COORDINATOR, c, round, config=dict(base)) for c in clients]
    keys: dict[str, dict[str, torch.Tensor]] = {}
    for req, rep in ask(ADVERTISE, msgs, lambda _: _template(("pk_c", "pk_s"), 32),
                        ("sig", "cred")):
        keys[req.dst] = dict(rep.tensors)
    u1 = [c for c in clients if c in keys]
    k = min(neighbours if neighbours is not None else default_neighbours(len(u1)),
            max(len(u1) - 1, 0))
    t = shamir_threshold(k, threshold) if k >= 1 else 0
    state["k"], state["t"] = k, t
    need = max(min_contributors, t + 1, 2)
    if len(u1) < need:
        return result(f"secure aggregation needs at least {need} clients, but only {len(u1)} "
                      f"of {len(clients)} advertised keys; sample more clients.")

    # 2. share keys along the neighbour graph
    graph = neighbour_graph(u1, k, seed, session)
    k = len(graph[u1[0]])
    t = shamir_threshold(k, threshold)
    state["k"], state["t"] = k, t
    msgs = []
    for u in u1:
        tensors = {f"{name}/{v}": keys[v][name] for v in graph[u]
                   for name in ("pk_c", "pk_s", "sig", "cred")}
        msgs.append(Message(SHARE_KEYS, COORDINATOR, u, round, tensors,
                            {**base, "neighbours": graph[u], "threshold": t}))
    inbox: dict[str, dict[str, torch.Tensor]] = {u: {} for u in u1}  # recipient -> sender -> ct
    commits: dict[str, bytes] = {}
    for req, rep in ask(SHARE_KEYS, msgs, lambda m: {
            **_template((f"ct/{v}" for v in m.config["neighbours"]), CT_BYTES),
            **_template(("commit_b",), 32)}):
        commits[req.dst] = raw(rep.tensors["commit_b"])
        for v in graph[req.dst]:
            inbox[v][req.dst] = rep.tensors[f"ct/{v}"]
    u1p = [u for u in u1 if u not in dropped]
    active = {u: [v for v in graph[u] if v in inbox[u] and v in set(u1p)] for u in u1p}
    short = [u for u in u1p if len(active[u]) < t]
    if short:
        return result(f"secure aggregation cannot go on: {len(short)} client(s) kept fewer than "
                      f"t={t} of their {k} neighbours after key sharing (e.g. {short[0]!r}: "
                      f"{len(active[short[0]])}); no result is used. Raise "
                      "secagg.neighbours, or reduce dropouts.")

    # 3. masked inputs, summed as they arrive
    levels = levels_for(len(u1p))
    state["levels"] = levels
    total = np.zeros(length, dtype=np.uint32)
    sum_s = 0.0
    cfg = {**config, **base, "task": task, "levels": levels, "secagg": True}
    msgs = [Message(MASKED_INPUT, COORDINATOR, u, round,
                    {**(payload or {}), **{f"{CT_PREFIX}{v}": inbox[u][v] for v in active[u]}},
                    cfg) for u in u1p]
    u2: list[str] = []
    for req, rep in ask(MASKED_INPUT, msgs, lambda _: _template(("masked",), length,
                                                                 torch.int32)):
        t0 = time.perf_counter()
        total += rep.tensors["masked"].numpy().view(np.uint32)
        sum_s += time.perf_counter() - t0
        u2.append(req.dst)
    timings["sum_s"] = sum_s
    if len(u2) < max(min_contributors, t):
        return result(f"secure aggregation got {len(u2)} masked inputs of {len(u1p)}, fewer "
                      f"than {max(min_contributors, t)} (the threshold t={t} or min_replies); "
                      "no partial result is used.")

    # 4. consistency: every survivor signs the set of survivors
    survivors = sorted(u2)
    msgs = [Message(CONSISTENCY, COORDINATOR, u, round, config={**base, "survivors": survivors})
            for u in survivors]
    sigs: dict[str, torch.Tensor] = {}
    for req, rep in ask(CONSISTENCY, msgs, lambda _: {}, ("sig",)):
        sigs[req.dst] = rep.tensors["sig"]

    # 5. unmask: each signer gets its neighbours' signatures; it decides which shares it owes
    alive = set(u2)
    gone = [u for u in u1p if u not in alive]
    msgs = [Message(UNMASK, COORDINATOR, u, round,
                    {f"sig/{v}": sigs[v] for v in active[u] if v in sigs},
                    {**base, "survivors": survivors}) for u in survivors if u in sigs]
    b_shares: dict[str, list[tuple[str, int, bytes]]] = {u: [] for u in u2}
    s_shares: dict[str, list[tuple[str, int, bytes]]] = {u: [] for u in gone}

    def owed(m: Message) -> Params:
        u = m.dst
        return _template([*(f"s/{v}" for v in active[u] if v not in alive),
                          *(f"b/{v}" for v in active[u] if v in alive)], 2 + SHARE_BYTES)

    for req, rep in ask(UNMASK, msgs, owed):
        for name, tensor in rep.tensors.items():
            which, v = name.split("/", 1)
            share = raw(tensor)
            (s_shares if which == "s" else b_shares)[v].append(
                (req.dst, int.from_bytes(share[:2], "big"), share[2:]))
    needed_s = [d for d in gone if any(v in alive for v in active[d])]
    lacking = [(u, len(b_shares[u])) for u in u2 if len(b_shares[u]) < t]
    lacking += [(d, len(s_shares[d])) for d in needed_s if len(s_shares[d]) < t]
    if lacking:
        u, have = lacking[0]
        return result(f"secure aggregation cannot unmask: {len(lacking)} client(s) have fewer "
                      f"than t={t} surviving neighbours holding their shares (e.g. {u!r}: "
                      f"{have} of {t}); no partial result is used. Raise secagg.neighbours, "
                      "or reduce dropouts.")
    t0 = time.perf_counter()
    buf = bytearray(4 * length + 15)
    for u in u2:
        b, bad = recover(b_shares[u], t, KEY_BYTES, _committed(session, u, commits[u]))
        if b is None:
            return result(f"secure aggregation cannot unmask {u!r}: no {t} of its "
                          f"{len(b_shares[u])} shares rebuild the self-mask seed it committed "
                          f"to (suspects: {', '.join(bad)}); no partial result is used.")
        _name(dropped, bad, f"unmask: sent a share of {u!r}'s self-mask seed that does not "
                            "match the seed it committed to (a corrupted or forged share)")
        total -= crypto.mask_stream(b, length, buf)
    for d in needed_s:
        pk_s = raw(keys[d]["pk_s"])
        s_raw, bad = recover(s_shares[d], t, KEY_BYTES, _of_public(pk_s))
        if s_raw is None:
            return result(f"secure aggregation cannot unmask: the shares of {d!r}'s key do not "
                          f"rebuild its public key (suspects: {', '.join(bad)}); no partial "
                          "result is used.")
        _name(dropped, bad, f"unmask: sent a share of {d!r}'s key that does not match its "
                            "public key (a corrupted or forged share)")
        sk = load_private(s_raw)
        for v in active[d]:
            if v in alive:
                m = crypto.mask_stream(pair_mask_key(sk, raw(keys[v]["pk_s"]), session, d, v),
                                       length, buf)
                if v < d:  # v added +PRG(s_vd)
                    total -= m
                else:
                    total += m
    timings["unmask_s"] = time.perf_counter() - t0
    return result(None, total, u2)


def _committed(session: str, client: str, commit: bytes) -> Callable[[bytes], bool]:
    """Whether a rebuilt self-mask seed is the one ``client`` committed to."""
    return lambda seed: commitment(session, client, seed) == commit


def _of_public(public: bytes) -> Callable[[bytes], bool]:
    """Whether a rebuilt private key is the one of ``public``."""
    def check(key: bytes) -> bool:
        try:
            return public_of(key) == public
        except ValueError:
            return False
    return check


def _name(dropped: dict[str, str], senders: Sequence[str], what: str) -> None:
    for s in senders:
        dropped.setdefault(s, what)
