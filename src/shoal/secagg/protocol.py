"""SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) as message kinds: the client's side.

Everything the coordinator and the clients exchange is a :class:`~shoal.message.Message` sent
over a :class:`~shoal.transport.Transport`, so the protocol runs in the simulator and over the
network unchanged. One *session* (one secure sum) is five request/reply steps; the coordinator's
side is :func:`shoal.secagg.session.secure_sum`::

    secagg.advertise     client -> two fresh X25519 public keys, c (share encryption) and s
                         (mask agreement), signed with the client's credentials (a per-run key
                         in simulation, its CA-issued certificate key in deployment)
    secagg.share_keys    coordinator -> the client's neighbours (a random k-regular graph),
                         their signed public keys and the Shamir threshold t; the client checks
                         every signature (a coordinator that swaps in its own keys is refused)
                         and t > k/2; client -> Shamir shares of its s private key and of a
                         fresh 256-bit self-mask seed b, one pair per neighbour, each AES-GCM
                         encrypted under HKDF(X25519(c_u, c_v)), and a commitment to b
                         (SHA-256), checked when b is rebuilt
    secagg.masked_input  coordinator -> the payload (e.g. the global model), the task, the
                         quantization levels, and the encrypted shares addressed to the client;
                         client -> y_u = q_u + PRG(b_u) + sum_v +-PRG(s_uv)  (mod 2^32)
    secagg.consistency   coordinator -> the set U3 of clients whose masked inputs arrived;
                         client -> its signature of U3
    secagg.unmask        coordinator -> U3 again and the signatures of U3 by the client's
                         neighbours; the client refuses unless U3 is the set it signed and at
                         least t of its neighbours signed the same; then -> its share of s_v
                         for each neighbour v outside U3 and of b_v for each v in U3 — decided
                         by the signed U3, never by what the coordinator says of one client

A client never reveals both shares of one neighbour, and with t > k/2 no split of a client's
neighbours can yield t shares of each kind: a coordinator telling some neighbours that a client
survived and others that it dropped gets neither its self-mask seed nor its key, and the
clients say why they refuse. Key material and seeds come from the OS CSPRNG, never from the run
seed (which the coordinator knows); only the stochastic rounding and the graph derive from the
seed, so the secure sum, and hence training, is reproducible.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..message import Message
from ..node import Handler, NodeContext
from ..seeding import numpy_rng
from . import crypto
from .crypto import agree, decrypt, encrypt, private_bytes, public_bytes, random_key
from .errors import SecAggError
from .quantize import Block, quantize
from .shamir import SHARE_BYTES, split_bytes

__all__ = ["ADVERTISE", "CONSISTENCY", "CT_PREFIX", "KINDS", "MASKED_INPUT", "SHARE_KEYS",
           "UNMASK", "InputFn", "SecAggClient", "commitment", "majority", "pair_mask_key", "raw",
           "rounding_rng", "share_key", "statement", "u8"]

ADVERTISE = "secagg.advertise"
SHARE_KEYS = "secagg.share_keys"
MASKED_INPUT = "secagg.masked_input"
CONSISTENCY = "secagg.consistency"
UNMASK = "secagg.unmask"
KINDS = (ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK)
"""The message kinds of one secure-aggregation session, in order."""

CT_PREFIX = "secagg/ct/"
"""Name prefix of the encrypted shares carried beside the payload of ``secagg.masked_input``."""

InputFn = Callable[[Message, NodeContext], list[Block]]
"""``fn(message, context) -> blocks``: a client's input to a secure sum (on the client), as
float blocks with public bounds; ``message`` carries the payload and the task's config."""


def rounding_rng(seed: int, session: str, client: str) -> np.random.Generator:
    """The generator of a client's stochastic rounding in a session (from the run's seed)."""
    return numpy_rng(seed, "secagg-rounding", session, client)


def statement(*parts: object) -> bytes:
    """The bytes a party signs: ``parts`` (strings, numbers, bytes as hex) in one unambiguous
    JSON list under this protocol's name."""
    return json.dumps(["shoal-secagg-v2", *(p.hex() if isinstance(p, bytes) else p
                                            for p in parts)]).encode()


def commitment(session: str, client: str, seed: bytes) -> bytes:
    """A client's commitment to its self-mask seed: SHA-256 of the seed in its context."""
    return hashlib.sha256(statement("commit", session, client, seed)).digest()


def _context(session: str, purpose: str, a: str, b: str) -> bytes:
    """The HKDF info binding a key to its session, purpose and (unordered) pair of parties."""
    return json.dumps(["shoal-secagg-v1", session, purpose, *sorted((a, b))]).encode()


def _aad(session: str, sender: str, recipient: str) -> bytes:
    return json.dumps(["shoal-secagg-share", session, sender, recipient]).encode()


def pair_mask_key(private: X25519PrivateKey, peer_public: bytes, session: str, me: str,
                  peer: str) -> bytes:
    """The 256-bit AES-CTR key of the pairwise mask between ``me`` and ``peer``."""
    return agree(private, peer_public, _context(session, "mask", me, peer))


def share_key(private: X25519PrivateKey, peer_public: bytes, session: str, me: str,
              peer: str) -> bytes:
    """The 256-bit AES-GCM key encrypting the shares between ``me`` and ``peer``."""
    return agree(private, peer_public, _context(session, "share", me, peer))


def u8(data: bytes) -> torch.Tensor:
    """Bytes as a 1-D uint8 tensor (what messages carry)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def raw(tensor: torch.Tensor) -> bytes:
    """A 1-D uint8 tensor's bytes."""
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise SecAggError(f"secagg: expected a 1-D uint8 tensor of bytes, got {tensor.dtype} "
                          f"with shape {tuple(tensor.shape)}.")
    return tensor.numpy().tobytes()


def _add_masks(q: np.ndarray, me: str, self_seed: bytes,
               pair_keys: Iterable[tuple[str, bytes]]) -> np.ndarray:
    """``q + PRG(self_seed) + sum(+-PRG(key))`` in place, modulo 2^32."""
    n = q.shape[0]
    buf = bytearray(4 * n + 15)
    q += crypto.mask_stream(self_seed, n, buf)
    for peer, key in pair_keys:
        m = crypto.mask_stream(key, n, buf)
        if me < peer:
            q += m
        else:
            q -= m
    return q


def majority(k: int) -> int:
    """The smallest threshold above half of ``k`` neighbours: ``k // 2 + 1``."""
    return k // 2 + 1


# -- client side ---------------------------------------------------------------------------------

class SecAggClient:
    """The client's side of secure aggregation: a handler per message kind.

    ``inputs`` maps a task name (``"train"``, ``"evaluate"``) to the function computing the
    client's input for it; ``seed`` is the run's seed (for the stochastic rounding only).
    ``min_survivors`` is the smallest survivor set the client signs: a coordinator that
    claims honest clients dropped, to unmask a sum of fewer inputs (with distributed DP: fewer
    noise shares) than the client agreed to, is refused.
    Per-session state (private keys, shares received) lives in the node's ``context.state``
    and is deleted once the client has answered ``secagg.unmask``. The node's
    ``context.credentials`` sign for it and check its neighbours' signatures.
    """

    def __init__(self, inputs: Mapping[str, InputFn], seed: int = 0, min_survivors: int = 1):
        self.inputs = dict(inputs)
        self.seed = seed
        self.min_survivors = min_survivors

    def handlers(self) -> dict[str, Handler]:
        """The five ``secagg.*`` handlers."""
        return {ADVERTISE: self.advertise, SHARE_KEYS: self.share_keys,
                MASKED_INPUT: self.masked_input, CONSISTENCY: self.consistency,
                UNMASK: self.unmask}

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

    @staticmethod
    def _credentials(context: NodeContext) -> Any:
        if context.credentials is None:
            raise SecAggError(
                f"client {context.node_id!r} has no credentials to sign with, so a coordinator "
                "could swap its keys unnoticed; the simulator gives every node per-run keys and "
                "`shoal join` uses the node's certificate (not --insecure).")
        return context.credentials

    def advertise(self, message: Message, context: NodeContext) -> Message:
        """Make two fresh key pairs for the session; answer with the public keys, signed."""
        session = message.config.get("session")
        if not isinstance(session, str) or not session:
            raise SecAggError(f"{ADVERTISE}: config 'session' must be a non-empty string "
                              f"(got {session!r}).")
        creds = self._credentials(context)
        c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        pk_c, pk_s = public_bytes(c), public_bytes(s)
        sig = creds.sign(statement("keys", session, context.node_id, pk_c, pk_s))
        # One session at a time: a newer session replaces any a dropout left behind.
        context.state["secagg"] = {session: {"c": c, "s": s, "stage": 1}}
        return message.reply(tensors={"pk_c": u8(pk_c), "pk_s": u8(pk_s), "sig": u8(sig),
                                      "cred": u8(creds.credential())})

    def share_keys(self, message: Message, context: NodeContext) -> Message:
        """Check the neighbours' signed keys and the threshold; Shamir-share the s private key
        and a fresh self-mask seed among the neighbours (one AES-GCM ciphertext each) and
        commit to the seed."""
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
        if t < majority(len(neighbours)):
            raise SecAggError(
                f"{SHARE_KEYS}: client {me!r} refuses threshold t={t} for {len(neighbours)} "
                f"neighbours: below {majority(len(neighbours))} (more than half), a coordinator "
                "that tells some neighbours a client survived and others that it dropped could "
                "collect both of its shares.")
        try:
            keys = {v: tuple(raw(message.tensors[f"{name}/{v}"])
                             for name in ("pk_c", "pk_s", "sig", "cred")) for v in neighbours}
        except KeyError as e:
            raise SecAggError(f"{SHARE_KEYS}: client {me!r} got no {e.args[0]!r} for one of its "
                              "neighbours.") from e
        creds = self._credentials(context)
        for v, (pk_c_v, pk_s_v, sig_v, cred_v) in keys.items():
            why = creds.verify(v, cred_v, statement("keys", session, v, pk_c_v, pk_s_v), sig_v)
            if why is not None:
                raise SecAggError(f"{SHARE_KEYS}: client {me!r} refuses the keys given for its "
                                  f"neighbour {v!r}: {why}; the coordinator may have swapped "
                                  "them.")
        own = [public_bytes(st["c"]), public_bytes(st["s"])]
        all_keys = [*own, *(k[0] for k in keys.values()), *(k[1] for k in keys.values())]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError(f"{SHARE_KEYS}: client {me!r} got repeated public keys; every "
                              "key of a session must be distinct.")
        self_seed = random_key()
        xs = list(range(1, len(neighbours) + 1))
        shares_s = split_bytes(private_bytes(st["s"]), xs, t)
        shares_b = split_bytes(self_seed, xs, t)
        out = {"commit_b": u8(commitment(session, me, self_seed))}
        for x, v, sh_s, sh_b in zip(xs, neighbours, shares_s, shares_b, strict=True):
            key = share_key(st["c"], keys[v][0], session, me, v)
            out[f"ct/{v}"] = u8(encrypt(key, x.to_bytes(2, "big") + sh_s + sh_b,
                                        _aad(session, me, v)))
        st.update(stage=2, neighbours=neighbours, t=t, keys=keys, b=self_seed)
        return message.reply(tensors=out)

    def masked_input(self, message: Message, context: NodeContext) -> Message:
        """Compute the task's input, quantize it, and answer with it masked."""
        st = self._state(message, context, 2)
        me, session = context.node_id, message.config["session"]
        cts = {name[len(CT_PREFIX):]: raw(t) for name, t in message.tensors.items()
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
        masks = [(v, pair_mask_key(st["s"], st["keys"][v][1], session, me, v)) for v in active]
        y = _add_masks(q, me, st["b"], masks)
        st.update(stage=3, active=active, cts=cts)
        return message.reply(tensors={"masked": torch.from_numpy(y.view(np.int32))})

    def consistency(self, message: Message, context: NodeContext) -> Message:
        """Sign the set of clients whose masked inputs the coordinator says it received."""
        st = self._state(message, context, 3)
        me, session = context.node_id, message.config["session"]
        survivors = message.config.get("survivors")
        if not isinstance(survivors, list) or me not in survivors \
                or survivors != sorted(set(map(str, survivors))):
            raise SecAggError(f"{CONSISTENCY}: client {me!r} got an invalid survivor set; "
                              "expected the sorted ids of the clients whose masked inputs "
                              "arrived, its own among them.")
        if len(survivors) < self.min_survivors:
            raise SecAggError(f"{CONSISTENCY}: client {me!r} refuses to sign a survivor set of "
                              f"{len(survivors)} clients: it takes part only in sums of at "
                              f"least {self.min_survivors} inputs.")
        sig = self._credentials(context).sign(statement("survivors", session, *survivors))
        st.update(stage=4, survivors=survivors)
        return message.reply(tensors={"sig": u8(sig)})

    def unmask(self, message: Message, context: NodeContext) -> Message:
        """Check that the survivor set is the one this client signed and that at least t of
        its neighbours signed it too; then answer with the shares it decides: of s for
        neighbours outside the set, of b for those in it. Then forget the session."""
        st = self._state(message, context, 4)
        me, session = context.node_id, message.config["session"]
        survivors = message.config.get("survivors")
        if survivors != st["survivors"]:
            raise SecAggError(f"{UNMASK}: client {me!r} refuses: the coordinator presents "
                              "another survivor set than the one it showed this client to "
                              "sign; it may be telling clients different stories.")
        data = statement("survivors", session, *survivors)
        creds = self._credentials(context)
        signed = []
        for name, sig in message.tensors.items():
            v = name.removeprefix("sig/")
            if not name.startswith("sig/") or v not in st["keys"] or v not in survivors:
                raise SecAggError(f"{UNMASK}: client {me!r} got an unexpected tensor {name!r}; "
                                  "expected signatures of its surviving neighbours.")
            why = creds.verify(v, st["keys"][v][3], data, raw(sig))
            if why is not None:
                raise SecAggError(f"{UNMASK}: client {me!r} refuses: {why} for the survivor "
                                  f"set; the clients were shown different sets.")
            signed.append(v)
        if len(signed) < st["t"]:
            raise SecAggError(f"{UNMASK}: client {me!r} refuses: only {len(signed)} of its "
                              f"neighbours signed the survivor set, fewer than the threshold "
                              f"{st['t']}; it reveals no shares.")
        alive = set(survivors)
        dropped = [v for v in st["active"] if v not in alive]
        kept = [v for v in st["active"] if v in alive]
        told = message.config.get("dropped")
        if told is not None and sorted(map(str, told)) != dropped:
            raise SecAggError(f"{UNMASK}: client {me!r} refuses: the coordinator says "
                              f"{sorted(set(map(str, told)) ^ set(dropped))!r} dropped out, but "
                              "the survivor set the clients signed says otherwise; revealing "
                              "both shares of a client would unmask its input.")
        if len(kept) < st["t"]:
            raise SecAggError(f"{UNMASK}: client {me!r} is told only {len(kept)} of its "
                              f"neighbours survived, fewer than the threshold {st['t']}; its "
                              "input could not be unmasked, so it reveals no shares.")
        out = {}
        for v in [*dropped, *kept]:
            key = share_key(st["c"], st["keys"][v][0], session, me, v)
            plain = decrypt(key, st["cts"][v], _aad(session, v, me))
            x, sh_s, sh_b = plain[:2], plain[2:2 + SHARE_BYTES], plain[2 + SHARE_BYTES:]
            out[f"s/{v}" if v in dropped else f"b/{v}"] = u8(x + (sh_s if v in dropped
                                                                  else sh_b))
        del context.state["secagg"][session]
        return message.reply(tensors=out)
