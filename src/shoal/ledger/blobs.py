"""Weights blobs: peers' model weights, addressed by their SHA-256, fetched peer to peer.

A swarm peer's ledger entry records the SHA-256 of its weights blob, never the weights: a
model of hundreds of megabytes has no place in a replicated key-value store. The blob itself
travels directly between peers, and the hash on the (signed) entry is what makes it
trustworthy: a fetcher accepts the bytes only when their SHA-256 is the recorded one, so a
peer that serves anything else (a bug, a tampered store, a lie) is caught, whoever it is.

* :func:`blob_bytes` / :func:`blob_params`: the canonical serialization of a
  :data:`~shoal.tree.Params` dict. Equal tensors (same names, dtypes, shapes and bits) give
  the same bytes, hence the same hash, in every process, on every machine and with every
  version of the libraries around shoal: the format is shoal's own (below), not a
  third-party serializer whose output could change between releases.
* :class:`BlobStore`: the blobs a peer serves, in memory, bounded (see its policy).
* :mod:`shoal.ledger.blob_service`: a store served peer to peer over mutual TLS, and fetched.

Blob format (version 1; every integer big endian, tensor data little endian)::

    b"SHOLBLOB"                    8 bytes of magic
    version                        uint16 (1)
    header length                  uint32
    header                         JSON {"tensors": [[name, dtype, shape], ...]} sorted by
                                   name, written with separators (",", ":") and ASCII only
    data                           each tensor's bytes, row major, in header order, no padding

A blob is canonical: :func:`blob_params` refuses bytes that :func:`blob_bytes` would not have
written (another key order, spacing, trailing bytes), so one set of params has exactly one
blob and one hash.

"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import TransportError, UpdateError
from ..net.wire import DTYPES, json_depth
from ..tree import Params, check_update

__all__ = ["BLOB_VERSION", "MAX_HEADER_BYTES", "SHA256_PATTERN", "BlobError", "BlobStore", "blob_bytes",
           "blob_hash", "blob_params"]

log = logging.getLogger(__name__)

BLOB_MAGIC = b"SHOLBLOB"
BLOB_VERSION = 1
"""The version of the blob format :func:`blob_bytes` writes (part of every blob's bytes)."""
_PREFIX = struct.Struct(">8sHI")
MAX_HEADER_BYTES = 16 << 20
"""The largest blob header :func:`blob_params` parses (a model's names and shapes take far
less; a larger one is refused unparsed)."""

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class BlobError(TransportError):
    """A blob could not be fetched, stored or decoded: the peer has no such blob, it sent
    bytes whose SHA-256 is not the one asked for, it sent more than allowed, it does not
    speak the protocol, or the bytes are not a shoal blob. ``address`` (the peer, when one is
    involved) and ``sha256`` (the blob asked for) say which."""

    def __init__(self, message: str, *, address: str | None = None,
                 sha256: str | None = None):
        super().__init__(message)
        self.address = address
        self.sha256 = sha256


# -- the canonical serialization ----------------------------------------------------------------


def blob_hash(data: bytes) -> str:
    """The SHA-256 of ``data``, lower-case hex: a blob's address."""
    return hashlib.sha256(data).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _little_endian(raw: Tensor, itemsize: int) -> Tensor:
    """``raw`` (native-order bytes, uint8) in little-endian order (a no-op on such hosts)."""
    if sys.byteorder == "little" or itemsize == 1 or raw.numel() == 0:
        return raw
    return raw.reshape(-1, itemsize).flip(1).reshape(-1).contiguous()


def _header(specs: Iterable[tuple[str, str, list[int]]]) -> bytes:
    body = {"tensors": [[n, d, s] for n, d, s in specs]}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def blob_bytes(params: Mapping[str, Tensor]) -> bytes:
    """The canonical blob of ``params`` (see the module docstring): deterministic, so equal
    tensors give equal bytes and :func:`blob_hash` in every process.

    Tensors may be on any device, non-contiguous or require grad (their values are written);
    a dtype outside :data:`shoal.net.wire.DTYPES`, a sparse tensor or a name that is not a
    string raises :class:`~shoal.errors.UpdateError`.
    """
    specs: list[tuple[str, str, list[int]]] = []
    parts: list[Any] = []
    for name in sorted(params, key=lambda k: (not isinstance(k, str), str(k))):
        t = params[name]
        if not isinstance(name, str):
            raise UpdateError(f"blob: parameter name {name!r} is a {type(name).__name__}, "
                              "expected a string (a state_dict's names).")
        if not isinstance(t, Tensor):
            raise UpdateError(f"blob: {name!r} is a {type(t).__name__}, expected a tensor.")
        if t.layout != torch.strided:
            raise UpdateError(f"blob: {name!r} is a {t.layout} tensor; only dense tensors "
                              "are written (call .to_dense() first).")
        dname = _dtype_name(t.dtype)
        if dname not in DTYPES:
            raise UpdateError(f"blob: {name!r} has dtype {t.dtype}; expected one of "
                              f"{', '.join(DTYPES)}.")
        t = t.detach().cpu().contiguous()
        specs.append((name, dname, [int(s) for s in t.shape]))
        if t.numel():
            raw = _little_endian(t.reshape(-1).view(torch.uint8), t.element_size())
            parts.append(raw.numpy())
    head = _header(specs)
    return b"".join([_PREFIX.pack(BLOB_MAGIC, BLOB_VERSION, len(head)), head, *parts])


def _malformed(why: str) -> BlobError:
    return BlobError(f"blob: not a valid shoal weights blob: {why}.")


def blob_params(data: bytes, template: Mapping[str, Tensor] | None = None) -> Params:
    """The params in the blob ``data`` (the inverse of :func:`blob_bytes`).

    Bytes that are not a canonical shoal blob (wrong magic or version, truncated, trailing
    bytes, a malformed or non-canonical header) raise :class:`BlobError`. With ``template``
    (the model's params) the blob must hold exactly its names, each with its shape and dtype,
    else :class:`~shoal.errors.UpdateError` names the first difference; the result then
    follows the template's order (sorted by name otherwise). Values are not checked for being
    finite: that is the aggregation's job (:func:`shoal.tree.check_update`).
    """
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise _malformed(f"{len(view)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != BLOB_MAGIC:
        raise _malformed(f"it starts with {bytes(magic)!r}, expected {BLOB_MAGIC!r}")
    if version != BLOB_VERSION:
        raise BlobError(f"blob: written in shoal blob format version {version}, this node "
                        f"reads version {BLOB_VERSION}; run the same shoal release on every "
                        "peer.")
    if hlen > MAX_HEADER_BYTES:
        raise _malformed(f"its header of {hlen} bytes is over the limit of {MAX_HEADER_BYTES}")
    if _PREFIX.size + hlen > len(view):
        raise _malformed(f"its header of {hlen} bytes runs past its end ({len(view)} bytes; "
                         "truncated?)")
    raw_head = bytes(view[_PREFIX.size:_PREFIX.size + hlen])
    if json_depth(raw_head) > 4:
        raise _malformed("its header nests JSON deeper than the format's 4 levels")
    try:
        entries = json.loads(raw_head)["tensors"]
        specs: list[tuple[str, str, list[int]]] = []
        for entry in entries:
            name, dname, shape = entry
            if not isinstance(name, str) or not isinstance(dname, str) \
                    or not isinstance(shape, list):
                raise TypeError(f"entry {entry!r} is not [name, dtype, shape]")
            if any(type(s) is not int or s < 0 for s in shape):
                raise ValueError(f"tensor {name!r} has shape {shape}, expected non-negative "
                                 "integers")
            if dname not in DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {dname!r}, expected one of "
                                 f"{', '.join(DTYPES)}")
            specs.append((name, dname, shape))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError) as e:
        raise _malformed(f"bad header ({type(e).__name__}: {e})") from None
    names = [n for n, _, _ in specs]
    if names != sorted(set(names)) or _header(specs) != raw_head:
        raise _malformed("its header is not canonical (names unsorted or repeated, or "
                         "written differently than blob_bytes writes it)")
    pos = _PREFIX.size + hlen
    sizes = []
    for _, dname, shape in specs:
        n = 1
        for s in shape:
            n *= s
        sizes.append(n * torch.empty((), dtype=DTYPES[dname]).element_size())
    if pos + sum(sizes) != len(view):
        raise _malformed(f"its header declares {sum(sizes)} data bytes, it holds "
                         f"{len(view) - pos}")
    out: dict[str, Tensor] = {}
    for (name, dname, shape), size in zip(specs, sizes, strict=True):
        dtype = DTYPES[dname]
        if size == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.from_numpy(np.frombuffer(view, dtype=np.uint8, count=size,
                                             offset=pos).copy())
        itemsize = torch.empty((), dtype=dtype).element_size()
        out[name] = _little_endian(raw, itemsize).view(dtype).reshape(shape)
        pos += size
    if template is not None:
        check_update(template, out, what="blob", finite=False)
        return {k: out[k] for k in template}
    return out


# -- the store ----------------------------------------------------------------------------------


class BlobStore:
    """The blobs a peer serves, by SHA-256, in memory and bounded; thread-safe.

    Policy: the store holds at most ``limit_bytes`` of blob data. Blobs named in the latest
    :meth:`keep` call are *kept* (never evicted: a peer keeps the blobs of its recent rounds,
    which others may still fetch); the others are a cache, evicted least recently used first
    (a :meth:`put` or a :meth:`get` uses a blob) whenever a :meth:`put` would go over the
    limit. A put that cannot fit even after evicting every blob not kept raises
    :class:`BlobError` and stores nothing, so memory stays bounded whatever is asked.
    """

    def __init__(self, limit_bytes: int = 1 << 30):
        if limit_bytes < 1:
            raise BlobError(f"BlobStore: limit_bytes={limit_bytes} is out of range; expected "
                            "a positive number of bytes.")
        self.limit_bytes = limit_bytes
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._kept: frozenset[str] = frozenset()
        self._nbytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of blob data held now (at most :attr:`limit_bytes`)."""
        with self._lock:
            return self._nbytes

    def __len__(self) -> int:
        """How many blobs are held."""
        with self._lock:
            return len(self._blobs)

    def __contains__(self, sha256: object) -> bool:
        """Whether the blob with this SHA-256 is held (does not count as a use)."""
        with self._lock:
            return sha256 in self._blobs

    def hashes(self) -> list[str]:
        """The SHA-256 of every blob held, least recently used first."""
        with self._lock:
            return list(self._blobs)

    def put(self, data: bytes) -> str:
        """Store ``data``; its SHA-256 (storing the same bytes again only marks them used).

        Evicts blobs not kept, least recently used first, to make room; raises
        :class:`BlobError` when ``data`` cannot fit (larger than the limit, or the kept blobs
        leave too little room)."""
        data = bytes(data)
        sha = blob_hash(data)
        with self._lock:
            if sha in self._blobs:
                self._blobs.move_to_end(sha)
                return sha
            kept = sum(len(b) for k, b in self._blobs.items() if k in self._kept)
            if kept + len(data) > self.limit_bytes:
                raise BlobError(
                    f"BlobStore: a blob of {len(data)} bytes does not fit: the store holds "
                    f"at most {self.limit_bytes} bytes (limit_bytes) and the {len(self._kept)} "
                    f"kept blob(s) take {kept}; raise limit_bytes or keep fewer rounds' blobs.",
                    sha256=sha)
            for old in list(self._blobs):
                if self._nbytes + len(data) <= self.limit_bytes:
                    break
                if old not in self._kept:
                    self._nbytes -= len(self._blobs.pop(old))
            self._blobs[sha] = data
            self._nbytes += len(data)
        return sha

    def get(self, sha256: str) -> bytes | None:
        """The blob with this SHA-256, or ``None`` when it is not held (never was, or was
        evicted); marks it used."""
        with self._lock:
            data = self._blobs.get(sha256)
            if data is not None:
                self._blobs.move_to_end(sha256)
            return data

    def keep(self, shas: Iterable[str]) -> None:
        """Keep exactly these blobs from eviction from now on (replacing the previous set):
        typically the blobs of the rounds other peers may still fetch. Blobs no longer kept
        stay until room is needed. A hash not held yet is kept once it is put."""
        with self._lock:
            self._kept = frozenset(shas)

    def discard(self, sha256: str) -> bool:
        """Drop the blob with this SHA-256 now (kept or not); whether it was held."""
        with self._lock:
            data = self._blobs.pop(sha256, None)
            if data is None:
                return False
            self._nbytes -= len(data)
            return True
