"""The wire format: a shoal :class:`~shoal.message.Message` as a sequence of byte frames.

Every frame starts with a 7-byte prefix: the magic ``b"SHOL"``, the format version (uint16, big
endian) and the frame type (one byte)::

    HELLO   JSON {"node_id": ...}             client -> coordinator, first frame of a stream
    WELCOME JSON {"node_id": ...}             coordinator -> client, the identity accepted
    HEADER  JSON {"seq", "message", "nbytes"} starts one message; ``message`` is its header
    CHUNK   raw tensor bytes                  the next (at most ``chunk_size``) data bytes
    BYE     JSON {"reason": ...}              the coordinator ends the session: the run is over
    RESTART JSON {"reason": ...}              the coordinator stops before the run is over
                                              (crash, Ctrl-C, SIGTERM): reconnect and wait

A message is one HEADER followed by CHUNK frames carrying its tensors' bytes back to back in
header order (``nbytes`` in all), so a model far beyond gRPC's 4 MB message limit travels in
small frames. A peer speaking another version is refused with a :class:`TransportError` that
names both versions.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TransportError
from ..message import Message

__all__ = ["BYE", "CHUNK", "HEADER", "HELLO", "MAGIC", "MAX_JSON_DEPTH", "RESTART", "VERSION",
           "WELCOME", "Assembler", "Frame", "control", "decode_frame", "encode_message",
           "json_depth"]

MAGIC = b"SHOL"
VERSION = 1
HELLO, WELCOME, HEADER, CHUNK, BYE, RESTART = 1, 2, 3, 4, 5, 6
_PREFIX = struct.Struct(">4sHB")
MAX_JSON_DEPTH = 64
"""The deepest JSON nesting a control or HEADER frame may have (shoal's own headers nest a few
levels; a deeper frame is refused before parsing, so it cannot exhaust the parser's stack)."""
_NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", HEADER: "HEADER", CHUNK: "CHUNK", BYE: "BYE",
          RESTART: "RESTART"}

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8,
              torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
}
"""The tensor dtypes the wire carries, by name."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its ``type`` and ``payload`` (parsed JSON, or bytes for CHUNK)."""

    type: int
    payload: Any


def _frame(kind: int, payload: bytes) -> bytes:
    return _PREFIX.pack(MAGIC, VERSION, kind) + payload


def control(kind: int, body: dict[str, Any]) -> bytes:
    """A HELLO, WELCOME, BYE or RESTART frame carrying the JSON ``body``."""
    return _frame(kind, json.dumps(body, separators=(",", ":")).encode())


def decode_frame(data: bytes) -> Frame:
    """Parse one frame; a foreign or other-version frame raises :class:`TransportError`."""
    if len(data) < _PREFIX.size:
        raise TransportError(f"wire: a frame of {len(data)} bytes is shorter than the "
                             f"{_PREFIX.size}-byte prefix; the peer does not speak shoal.")
    magic, version, kind = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise TransportError(f"wire: frame starts with {magic!r}, expected {MAGIC!r}; the peer "
                             "does not speak the shoal protocol.")
    if version != VERSION:
        raise TransportError(
            f"wire: the peer speaks shoal wire format version {version}, this node speaks "
            f"version {VERSION}; run the same shoal release on the coordinator and the clients."
        )
    if kind not in _NAMES:
        raise TransportError(f"wire: unknown frame type {kind}; expected one of "
                             f"{', '.join(f'{k} ({n})' for k, n in _NAMES.items())}.")
    body = data[_PREFIX.size:]
    if kind == CHUNK:
        return Frame(kind, body)
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and \
            (depth := json_depth(body)) > MAX_JSON_DEPTH:
        raise TransportError(f"wire: {_NAMES[kind]} frame nests JSON {depth} levels deep, over "
                             f"the limit of {MAX_JSON_DEPTH} levels (wire.MAX_JSON_DEPTH); shoal's "
                             "own headers nest a few levels (flatten a deeper message config), "
                             "so the frame was refused unparsed.")
    try:
        return Frame(kind, json.loads(body))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise TransportError(f"wire: {_NAMES[kind]} frame is not valid JSON ({e}).") from e


_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in the JSON text ``body`` (brackets inside strings
    do not count), found without parsing it, so a hostile frame cannot exhaust the stack."""
    depth = deepest = 0
    for m in _JSON_TOKENS.finditer(body):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def encode_message(message: Message, seq: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The frames of ``message`` (a HEADER then CHUNKs of at most ``chunk_size`` bytes)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in message.tensors.items()}
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    yield control(HEADER, {"seq": seq, "message": message.header(), "nbytes": nbytes})
    buf = bytearray()
    for v in tensors.values():
        if v.numel() == 0:
            continue
        raw = memoryview(v.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        pos = 0
        while pos < len(raw):
            take = min(chunk_size - len(buf), len(raw) - pos)
            buf += raw[pos:pos + take]
            pos += take
            if len(buf) == chunk_size:
                yield _frame(CHUNK, bytes(buf))
                buf.clear()
    if buf:
        yield _frame(CHUNK, bytes(buf))


class Assembler:
    """Rebuilds messages from HEADER and CHUNK frames, enforcing a size limit.

    :meth:`header` starts a message (and raises :class:`TransportError` when its header is
    malformed or it declares more than ``max_bytes``); :meth:`chunk` adds data and returns the
    finished ``(seq, message)`` once all declared bytes arrived, else ``None``.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._seq: int | None = None
        self._head: dict[str, Any] = {}
        self._specs: list[tuple[str, torch.dtype, list[int], int]] = []
        self._need = 0
        self._buf = bytearray()
        self.skip = 0
        """Bytes of a refused message still to be discarded."""

    @property
    def busy(self) -> bool:
        """Whether a message is partly received."""
        return self._seq is not None

    def header(self, body: Any) -> tuple[int, Message] | None:
        """Start a message from a HEADER body; a message without tensors is returned at once."""
        if self.busy:
            raise TransportError("wire: a new HEADER arrived before the previous message's "
                                 f"{self._need - len(self._buf)} remaining bytes.")
        try:
            seq = int(body["seq"])
            head = body["message"]
            nbytes = int(body["nbytes"])
            specs = []
            total = 0
            for name, (dtype_name, shape) in head["tensors"].items():
                dtype = DTYPES.get(dtype_name)
                if dtype is None:
                    raise TransportError(
                        f"wire: tensor {name!r} has dtype {dtype_name!r}; expected one of "
                        f"{', '.join(DTYPES)}.")
                shape = [int(s) for s in shape]
                if any(s < 0 for s in shape):
                    raise TransportError(f"wire: tensor {name!r} has a negative dimension "
                                         f"in shape {shape}.")
                size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                specs.append((str(name), dtype, shape, size))
                total += size
            fields = (str(head["kind"]), str(head["src"]), str(head["dst"]), int(head["round"]),
                      dict(head.get("config") or {}),
                      {str(k): float(v) for k, v in (head.get("metrics") or {}).items()},
                      head.get("error"))
        except TransportError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TransportError(f"wire: malformed message header ({type(e).__name__}: {e}); "
                                 "expected seq, message (kind, src, dst, round, tensors, "
                                 "config, metrics, error) and nbytes.") from e
        if total != nbytes:
            raise TransportError(f"wire: header declares {nbytes} data bytes but its tensors "
                                 f"need {total}.")
        if nbytes > self.max_bytes:
            self.skip = nbytes
            raise TransportError(
                f"message of {nbytes} bytes is over the limit of {self.max_bytes} bytes "
                "(network.max_message_mb); refused unread.")
        self._seq, self._specs, self._need = seq, specs, nbytes
        self._head = {"fields": fields}
        self._buf = bytearray()
        return self._finish() if nbytes == 0 else None

    def chunk(self, data: bytes) -> tuple[int, Message] | None:
        """Add data bytes; the finished message when complete."""
        if self.skip:
            self.skip -= min(self.skip, len(data))
            return None
        if not self.busy:
            raise TransportError("wire: a CHUNK arrived outside any message.")
        if len(self._buf) + len(data) > self._need:
            raise TransportError(f"wire: message data exceeds the {self._need} bytes its header "
                                 "declared.")
        self._buf += data
        return self._finish() if len(self._buf) == self._need else None

    def _finish(self) -> tuple[int, Message]:
        kind, src, dst, rnd, config, metrics, error = self._head["fields"]
        tensors = {}
        pos = 0
        buf = self._buf
        for name, dtype, shape, size in self._specs:
            raw = torch.frombuffer(buf, dtype=torch.uint8, offset=pos, count=size) if size \
                else torch.empty(0, dtype=torch.uint8)
            tensors[name] = raw.view(dtype).reshape(shape).clone()
            pos += size
        seq = self._seq
        assert seq is not None
        self._seq, self._specs, self._need, self._buf = None, [], 0, bytearray()
        return seq, Message(kind, src, dst, rnd, tensors, config, metrics,
                            None if error is None else str(error))
