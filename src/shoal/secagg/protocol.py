"""SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) as four message kinds.

Everything the coordinator and the clients exchange is a :class:`~shoal.message.Message` sent
over a :class:`~shoal.transport.Transport`, so the protocol runs in the simulator now and over
the network later, unchanged. One *session* (one secure sum) is four request/reply steps::

    secagg.advertise     client -> two fresh X25519 public keys: c (share encryption) and
                         s (mask agreement)
    secagg.share_keys    coordinator -> the client's neighbours (a random k-regular graph) and
                         their public keys, and the Shamir threshold t;
                         client -> Shamir shares of its s private key and of a fresh 256-bit
                         self-mask seed b, one pair per neighbour, each AES-GCM encrypted under
                         HKDF(X25519(c_u, c_v)): only that neighbour can read it
    secagg.masked_input  coordinator -> the payload (e.g. the global model), the task, the
                         quantization levels, and the encrypted shares addressed to the client;
                         client -> y_u = q_u + PRG(b_u) + sum_v +-PRG(s_uv)  (mod 2^32), where
                         q_u is its clipped, stochastically quantized input and s_uv =
                         HKDF(X25519(s_u, s_v)) is shared with each active neighbour v
                         (+ if u < v, - otherwise, so the pairwise masks cancel in the sum)
    secagg.unmask        coordinator -> which of the client's neighbours dropped and which
                         survived; client -> its share of s_v for each dropped v, and of b_v
                         for each surviving v (never both for one v)

The coordinator sums the masked vectors as they arrive (one at a time), rebuilds each survivor's
b from t shares and removes PRG(b), rebuilds each dropped client's s private key from t shares
(checked against its advertised public key) and removes the pairwise masks its surviving
neighbours added. A client that drops after key sharing or after its masked upload is thus
recovered; a neighbourhood with fewer than t survivors ends the session with an error and no
result. The coordinator only ever handles public keys, ciphertexts, masked vectors and the
shares it is entitled to; it never sees an individual input in the clear.

Trust model: an honest-but-curious coordinator that follows the protocol (it could otherwise
hand out its own public keys: there is no PKI), and clients of which fewer than t per
neighbourhood collude with it. Key material comes from the OS CSPRNG, never from the run seed
(which the coordinator knows); only the stochastic rounding and the graph derive from the seed,
so the secure sum, and hence training, is reproducible.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..message import COORDINATOR, Message
from ..node import Handler, NodeContext
from ..seeding import numpy_rng
from ..transport import Transport
from ..tree import Params
from ..validation import reply_problem
from .crypto import (
    KEY_BYTES,
    agree,
    decrypt,
    encrypt,
    load_private,
    mask_stream,
    private_bytes,
    public_bytes,
    public_of,
    random_key,
)
from .errors import SecAggError
from .graph import default_neighbours, neighbour_graph, shamir_threshold
from .quantize import Block, levels_for, quantize
from .shamir import SHARE_BYTES, combine_bytes, split_bytes

__all__ = ["ADVERTISE", "KINDS", "MASKED_INPUT", "SHARE_KEYS", "UNMASK", "InputFn",
           "SecAggClient", "SecureSum", "pair_mask_key", "rounding_rng", "secure_sum"]

ADVERTISE = "secagg.advertise"
SHARE_KEYS = "secagg.share_keys"
MASKED_INPUT = "secagg.masked_input"
UNMASK = "secagg.unmask"
KINDS = (ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK)
"""The message kinds of one secure-aggregation session, in order."""

CT_PREFIX = "secagg/ct/"
"""Name prefix of the encrypted shares carried beside the payload of ``secagg.masked_input``."""

InputFn = Callable[[Message, NodeContext], list[Block]]
"""``fn(message, context) -> blocks``: a client's input to a secure sum (on the client), as
float blocks with public bounds; ``message`` carries the payload and the task's config."""


def rounding_rng(seed: int, session: str, client: str) -> np.random.Generator:
    """The generator of a client's stochastic rounding in a session (from the run's seed)."""
    return numpy_rng(seed, "secagg-rounding", session, client)


def _context(session: str, purpose: str, a: str, b: str) -> bytes:
    """The HKDF info binding a key to its session, purpose and (unordered) pair of parties."""
    return json.dumps(["shoal-secagg-v1", session, purpose, *sorted((a, b))]).encode()


def _aad(session: str, sender: str, recipient: str) -> bytes:
    return json.dumps(["shoal-secagg-share", session, sender, recipient]).encode()


def pair_mask_key(private: X25519PrivateKey, peer_public: bytes, session: str, me: str,
                  peer: str) -> bytes:
    """The 256-bit AES-CTR key of the pairwise mask between ``me`` and ``peer``."""
    return agree(private, peer_public, _context(session, "mask", me, peer))


def _u8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _raw(tensor: torch.Tensor) -> bytes:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise SecAggError(f"secagg: expected a 1-D uint8 tensor of bytes, got {tensor.dtype} "
                          f"with shape {tuple(tensor.shape)}.")
    return tensor.numpy().tobytes()


def _add_masks(q: np.ndarray, me: str, self_seed: bytes,
               pair_keys: Iterable[tuple[str, bytes]]) -> np.ndarray:
    """``q + PRG(self_seed) + sum(+-PRG(key))`` in place, modulo 2^32."""
    n = q.shape[0]
    buf = bytearray(4 * n + 15)
    q += mask_stream(self_seed, n, buf)
    for peer, key in pair_keys:
        m = mask_stream(key, n, buf)
        if me < peer:
            q += m
        else:
            q -= m
    return q


# -- client side ---------------------------------------------------------------------------------

class SecAggClient:
    """The client's side of secure aggregation: a handler per message kind.

    ``inputs`` maps a task name (``"train"``, ``"evaluate"``) to the function computing the
    client's input for it; ``seed`` is the run's seed (for the stochastic rounding only).
    Per-session state (private keys, shares received) lives in the node's ``context.state``
    and is deleted once the client has answered ``secagg.unmask``.
    """

    def __init__(self, inputs: Mapping[str, InputFn], seed: int = 0):
        self.inputs = dict(inputs)
        self.seed = seed

    def handlers(self) -> dict[str, Handler]:
        """The four ``secagg.*`` handlers."""
        return {ADVERTISE: self.advertise, SHARE_KEYS: self.share_keys,
                MASKED_INPUT: self.masked_input, UNMASK: self.unmask}

    @staticmethod
    def _state(message: Message, context: NodeContext, stage: int) -> dict[str, Any]:
        session = message.config.get("session")
        st = context.state.get("secagg", {}).get(session)
        if st is None:
            raise SecAggError(f"client {context.node_id!r}: no secure-aggregation session "
                              f"{session!r}; it did not take part in {ADVERTISE}.")
        if st["stage"] != stage:
            raise SecAggError(f"client {context.node_id!r}: {message.kind} is out of order in "
                              f"session {session!r} (this client is at step {st['stage']}, the "
                              f"message needs step {stage}); each step is answered once.")
        return st

    def advertise(self, message: Message, context: NodeContext) -> Message:
        """Make two fresh key pairs for the session; answer with the public keys."""
        session = message.config.get("session")
        if not isinstance(session, str) or not session:
            raise SecAggError(f"{ADVERTISE}: config 'session' must be a non-empty string "
                              f"(got {session!r}).")
        c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        # One session at a time: a newer session replaces any a dropout left behind.
        context.state["secagg"] = {session: {"c": c, "s": s, "stage": 1}}
        return message.reply(tensors={"pk_c": _u8(public_bytes(c)),
                                      "pk_s": _u8(public_bytes(s))})

    def share_keys(self, message: Message, context: NodeContext) -> Message:
        """Shamir-share the s private key and a fresh self-mask seed among the neighbours;
        answer with one AES-GCM ciphertext per neighbour."""
        st = self._state(message, context, 1)
        me, session = context.node_id, message.config["session"]
        neighbours = [str(v) for v in message.config.get("neighbours", [])]
        t = message.config.get("threshold")
        if me in neighbours or len(set(neighbours)) != len(neighbours) or not neighbours:
            raise SecAggError(f"{SHARE_KEYS}: client {me!r} got an invalid neighbour list "
                              f"{neighbours!r}; expected distinct ids other than its own.")
        if not isinstance(t, int) or not 1 <= t <= len(neighbours):
            raise SecAggError(f"{SHARE_KEYS}: threshold must be an integer in "
                              f"[1, {len(neighbours)}] (got {t!r}).")
        try:
            pk_c = {v: _raw(message.tensors[f"pk_c/{v}"]) for v in neighbours}
            pk_s = {v: _raw(message.tensors[f"pk_s/{v}"]) for v in neighbours}
        except KeyError as e:
            raise SecAggError(f"{SHARE_KEYS}: client {me!r} got no public key {e.args[0]!r} "
                              "for one of its neighbours.") from e
        own = [public_bytes(st["c"]), public_bytes(st["s"])]
        keys = [*own, *pk_c.values(), *pk_s.values()]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"{SHARE_KEYS}: client {me!r} got repeated public keys; every "
                              "key of a session must be distinct.")
        self_seed = random_key()
        xs = list(range(1, len(neighbours) + 1))
        shares_s = split_bytes(private_bytes(st["s"]), xs, t)
        shares_b = split_bytes(self_seed, xs, t)
        out = {}
        for x, v, sh_s, sh_b in zip(xs, neighbours, shares_s, shares_b, strict=True):
            key = agree(st["c"], pk_c[v], _context(session, "share", me, v))
            out[f"ct/{v}"] = _u8(encrypt(key, x.to_bytes(2, "big") + sh_s + sh_b,
                                         _aad(session, me, v)))
        st.update(stage=2, neighbours=neighbours, t=t, pk_c=pk_c, pk_s=pk_s, b=self_seed)
        return message.reply(tensors=out)

    def masked_input(self, message: Message, context: NodeContext) -> Message:
        """Compute the task's input, quantize it, and answer with it masked."""
        st = self._state(message, context, 2)
        me, session = context.node_id, message.config["session"]
        cts = {name[len(CT_PREFIX):]: _raw(t) for name, t in message.tensors.items()
               if name.startswith(CT_PREFIX)}
        active = sorted(cts)
        if not set(active) <= set(st["neighbours"]):
            raise SecAggError(f"{MASKED_INPUT}: client {me!r} got shares from non-neighbours "
                              f"{sorted(set(active) - set(st['neighbours']))!r}.")
        if len(active) < st["t"]:
            raise SecAggError(f"{MASKED_INPUT}: client {me!r} has {len(active)} active "
                              f"neighbours, fewer than the threshold {st['t']}; it would not "
                              "be safe to go on.")
        task = message.config.get("task")
        fn = self.inputs.get(task)  # type: ignore[arg-type]
        if fn is None:
            raise SecAggError(f"{MASKED_INPUT}: client {me!r} has no input for task {task!r}; "
                              f"it knows {', '.join(sorted(self.inputs)) or 'none'}.")
        levels = message.config.get("levels")
        if not isinstance(levels, int) or levels < 1:
            raise SecAggError(f"{MASKED_INPUT}: config 'levels' must be an integer >= 1 "
                              f"(got {levels!r}).")
        payload = message.with_tensors({k: v for k, v in message.tensors.items()
                                        if not k.startswith(CT_PREFIX)})
        blocks = fn(payload, context)
        q = quantize(blocks, levels, rounding_rng(self.seed, session, me))
        keys = [(v, pair_mask_key(st["s"], st["pk_s"][v], session, me, v)) for v in active]
        y = _add_masks(q, me, st["b"], keys)
        st.update(stage=3, active=active, cts=cts)
        return message.reply(tensors={"masked": torch.from_numpy(y.view(np.int32))})

    def unmask(self, message: Message, context: NodeContext) -> Message:
        """Answer with the shares the coordinator needs: of s for dropped neighbours, of b for
        surviving ones; then forget the session."""
        st = self._state(message, context, 3)
        me, session = context.node_id, message.config["session"]
        dropped = [str(v) for v in message.config.get("dropped", [])]
        survivors = [str(v) for v in message.config.get("survivors", [])]
        if set(dropped) & set(survivors):
            raise SecAggError(f"{UNMASK}: client {me!r} was asked for both shares of "
                              f"{sorted(set(dropped) & set(survivors))!r}; that would unmask "
                              "their input, so it refuses.")
        if len(survivors) < st["t"]:
            raise SecAggError(f"{UNMASK}: client {me!r} is told only {len(survivors)} of its "
                              f"neighbours survived, fewer than the threshold {st['t']}; its "
                              "input could not be unmasked, so it reveals no shares.")
        unknown = (set(dropped) | set(survivors)) - set(st["active"])
        if unknown:
            raise SecAggError(f"{UNMASK}: client {me!r} holds no shares of "
                              f"{sorted(unknown)!r} (not active neighbours).")
        out = {}
        for v in [*dropped, *survivors]:
            key = agree(st["c"], st["pk_c"][v], _context(session, "share", me, v))
            plain = decrypt(key, st["cts"][v], _aad(session, v, me))
            x, sh_s, sh_b = plain[:2], plain[2:2 + SHARE_BYTES], plain[2 + SHARE_BYTES:]
            out[f"s/{v}" if v in dropped else f"b/{v}"] = _u8(x + (sh_s if v in dropped
                                                                   else sh_b))
        del context.state["secagg"][session]
        return message.reply(tensors=out)


# -- coordinator side ----------------------------------------------------------------------------

@dataclass
class SecureSum:
    """The outcome of one session.

    ``total`` is the exact sum, modulo 2^32, of the contributors' quantized inputs (``None``
    when ``failed`` says why there is no result); ``dropped`` maps each client that fell out to
    the step and reason; ``timings`` holds the coordinator's own compute time per phase.
    """

    total: np.ndarray | None
    contributors: list[str]
    dropped: dict[str, str]
    failed: str | None
    neighbours: int = 0
    threshold: int = 0
    levels: int = 0
    timings: dict[str, float] = field(default_factory=dict)


CT_BYTES = 12 + 2 + 2 * SHARE_BYTES + 16
"""Bytes of one encrypted pair of shares: nonce, x, share of s, share of b, GCM tag."""


def _template(names: Iterable[str], n: int, dtype: torch.dtype = torch.uint8) -> Params:
    """What a reply of one step must hold: these names, each a 1-D tensor of ``n`` ``dtype``."""
    return {name: torch.empty(n, dtype=dtype) for name in names}


def secure_sum(transport: Transport, clients: Sequence[str], *, round: int, session: str,
               task: str, length: int, payload: Params | None = None,
               config: Mapping[str, Any] | None = None, neighbours: int | None = None,
               threshold: float = 0.4, seed: int = 0, timeout: float | None = None,
               min_contributors: int = 1) -> SecureSum:
    """Run one SecAgg+ session over ``clients``: the exact sum of their quantized inputs.

    ``task`` names the clients' :data:`InputFn`, whose blocks must total ``length`` values;
    ``payload`` (e.g. the global params) and ``config`` go to the clients with
    ``secagg.masked_input``. ``neighbours`` is the degree of the graph (``None``:
    :func:`~shoal.secagg.graph.default_neighbours`), ``threshold`` the fraction of them needed
    to unmask a client. The session fails (``failed`` set, no ``total``) when fewer than
    ``min_contributors`` inputs arrive or a neighbourhood has fewer than t survivors.
    """
    dropped: dict[str, str] = {}
    timings: dict[str, float] = {}

    def ask(kind: str, messages: list[Message], template: Callable[[Message], Params]
            ) -> Iterable[tuple[Message, Message]]:
        for req, rep in zip(messages, transport.stream(messages, timeout), strict=True):
            reason = reply_problem(req, rep, template=template(req), what=f"{kind} reply")
            if reason is not None:
                dropped[req.dst] = f"{kind}: {reason}"
                continue
            yield req, rep

    def result(failed: str | None, total: np.ndarray | None = None,
               contributors: Sequence[str] = (), k: int = 0, t: int = 0,
               levels: int = 0) -> SecureSum:
        return SecureSum(total, list(contributors), dropped, failed, k, t, levels, timings)

    base = {"session": session}
    # 1. advertise keys
    msgs = [Message(ADVERTISE, COORDINATOR, c, round, config=dict(base)) for c in clients]
    keys: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for req, rep in ask(ADVERTISE, msgs, lambda _: _template(("pk_c", "pk_s"), 32)):
        keys[req.dst] = (rep.tensors["pk_c"], rep.tensors["pk_s"])
    u1 = [c for c in clients if c in keys]
    k = min(neighbours if neighbours is not None else default_neighbours(len(u1)),
            max(len(u1) - 1, 0))
    t = shamir_threshold(k, threshold) if k >= 1 else 0
    need = max(min_contributors, t + 1, 2)
    if len(u1) < need:
        return result(f"secure aggregation needs at least {need} clients, but only {len(u1)} "
                      f"of {len(clients)} advertised keys; sample more clients.", k=k, t=t)

    # 2. share keys along the neighbour graph
    graph = neighbour_graph(u1, k, seed, session)
    k = len(graph[u1[0]])
    t = shamir_threshold(k, threshold)
    msgs = []
    for u in u1:
        tensors = {}
        for v in graph[u]:
            tensors[f"pk_c/{v}"], tensors[f"pk_s/{v}"] = keys[v]
        msgs.append(Message(SHARE_KEYS, COORDINATOR, u, round, tensors,
                            {**base, "neighbours": graph[u], "threshold": t}))
    inbox: dict[str, dict[str, torch.Tensor]] = {u: {} for u in u1}  # recipient -> sender -> ct
    for req, rep in ask(SHARE_KEYS, msgs, lambda m: _template(
            (f"ct/{v}" for v in m.config["neighbours"]), CT_BYTES)):
        for v in graph[req.dst]:
            inbox[v][req.dst] = rep.tensors[f"ct/{v}"]
    u1p = [u for u in u1 if u not in dropped]
    active = {u: [v for v in graph[u] if v in inbox[u] and v in set(u1p)] for u in u1p}
    short = [u for u in u1p if len(active[u]) < t]
    if short:
        return result(f"secure aggregation cannot go on: {len(short)} client(s) kept fewer than "
                      f"t={t} of their {k} neighbours after key sharing (e.g. {short[0]!r}: "
                      f"{len(active[short[0]])}); no result is used. Lower secagg.threshold, "
                      "raise secagg.neighbours, or reduce dropouts.", k=k, t=t)

    # 3. masked inputs, summed as they arrive
    levels = levels_for(len(u1p))
    total = np.zeros(length, dtype=np.uint32)
    sum_s = 0.0
    cfg = {**dict(config or {}), **base, "task": task, "levels": levels, "secagg": True}
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
                      "no partial result is used.", k=k, t=t, levels=levels)

    # 4. unmask: shares of b for survivors, of s for dropped neighbours
    alive = set(u2)
    gone = [u for u in u1p if u not in alive]
    msgs = [Message(UNMASK, COORDINATOR, u, round, config={
        **base, "dropped": [v for v in active[u] if v not in alive],
        "survivors": [v for v in active[u] if v in alive]}) for u in u2]
    b_shares: dict[str, list[tuple[int, bytes]]] = {u: [] for u in u2}
    s_shares: dict[str, list[tuple[int, bytes]]] = {u: [] for u in gone}
    for _req, rep in ask(UNMASK, msgs, lambda m: _template(
            [*(f"s/{v}" for v in m.config["dropped"]),
             *(f"b/{v}" for v in m.config["survivors"])], 2 + SHARE_BYTES)):
        for name, tensor in rep.tensors.items():
            which, v = name.split("/", 1)
            raw = _raw(tensor)
            (s_shares if which == "s" else b_shares)[v].append(
                (int.from_bytes(raw[:2], "big"), raw[2:]))
    needed_s = [d for d in gone if any(v in alive for v in active[d])]
    lacking = [(u, len(b_shares[u])) for u in u2 if len(b_shares[u]) < t]
    lacking += [(d, len(s_shares[d])) for d in needed_s if len(s_shares[d]) < t]
    if lacking:
        u, have = lacking[0]
        return result(f"secure aggregation cannot unmask: {len(lacking)} client(s) have fewer "
                      f"than t={t} surviving neighbours holding their shares (e.g. {u!r}: "
                      f"{have} of {t}); no partial result is used. Lower secagg.threshold, "
                      "raise secagg.neighbours, or reduce dropouts.", k=k, t=t, levels=levels)
    t0 = time.perf_counter()
    buf = bytearray(4 * length + 15)
    for u in u2:
        seed_b = combine_bytes(b_shares[u][:t], KEY_BYTES)
        total -= mask_stream(seed_b, length, buf)
    for d in needed_s:
        raw = combine_bytes(s_shares[d][:t], KEY_BYTES)
        if public_of(raw) != _raw(keys[d][1]):
            return result(f"secure aggregation cannot unmask: the key rebuilt from the shares "
                          f"of {d!r} does not match its public key (corrupt shares); no "
                          "partial result is used.", k=k, t=t, levels=levels)
        sk = load_private(raw)
        for v in active[d]:
            if v in alive:
                m = mask_stream(pair_mask_key(sk, _raw(keys[v][1]), session, d, v), length, buf)
                if v < d:  # v added +PRG(s_vd)
                    total -= m
                else:
                    total += m
    timings["unmask_s"] = time.perf_counter() - t0
    return result(None, total, u2, k, t, levels)
