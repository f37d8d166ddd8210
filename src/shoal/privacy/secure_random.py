"""Randomness that protects privacy, drawn where no one else can regenerate it.

DP noise and the Poisson sampling of DP-SGD protect only while they are secret: anyone who can
redraw them — the coordinator, or anyone holding the run's config and seed, which every
participant has — subtracts the noise and is left with the exact update. So these draws never
derive from the run's seed. :class:`SecureGenerator` is an AES-256-CTR keystream (the
``cryptography`` package; what Opacus' secure mode intended with torchcsprng) keyed with 256
bits from the operating system's CSPRNG (``os.urandom``), turned into uniform numbers (24 or 53
random bits each) and, by the Box–Muller transform, Gaussians.

:func:`privacy_generator` is the one place the choice is made: secret (the default, always in
deployment) or, with ``reproducible=True`` — for research that wants bit-identical reruns, and
which the run's results then flag as not private against the coordinator — a keystream keyed by
the run's seed and the use's keys, so a rerun draws the same numbers.

Floating-point Gaussian sampling is not hardened against its known side channels (Mironov
2012; Haney et al. 2022); the discrete Gaussian of distributed DP draws integers exactly.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import Tensor

__all__ = ["KEY_BYTES", "SecureGenerator", "privacy_generator"]

KEY_BYTES = 32
"""The key of a generator: 256 bits (the issue's floor is 128)."""


class SecureGenerator:
    """Uniforms and Gaussians from an AES-256-CTR keystream; see the module docstring.

    ``key`` (32 bytes) defaults to ``os.urandom(32)``: a fresh secret no one else knows. Pass a
    key only to reproduce a stream (tests, ``reproducible`` runs)."""

    def __init__(self, key: bytes | None = None):
        key = os.urandom(KEY_BYTES) if key is None else key
        if len(key) != KEY_BYTES:
            raise ValueError(f"SecureGenerator: the key must be {KEY_BYTES} bytes "
                             f"(got {len(key)}).")
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = bytearray()
        self._out = bytearray()
        self.secret = True
        """Whether the key came from the OS (``False`` for a key derived from a seed)."""

    def __repr__(self) -> str:
        return f"SecureGenerator({'secret' if self.secret else 'seeded'})"

    def _words(self, count: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
        """``count`` random unsigned words of ``dtype`` from the keystream (a view of an
        internal buffer, valid until the next draw)."""
        nbytes = count * np.dtype(dtype).itemsize
        if len(self._zeros) < nbytes:
            self._zeros = bytearray(nbytes)
            self._out = bytearray(nbytes + 15)  # update_into wants block-size slack
        self._cipher.update_into(memoryview(self._zeros)[:nbytes], self._out)
        return np.frombuffer(self._out, dtype=dtype, count=count)

    def uniform(self, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``n`` uniforms in (0, 1): 24 random bits each for float32, 53 for float64 (never 0,
        so ``log`` is safe)."""
        if dtype == torch.float64:
            w = self._words(n, np.uint64)
            top = torch.from_numpy((w >> np.uint64(11)).view(np.int64))  # < 2^53
            return top.to(torch.float64).add_(0.5).mul_(2.0 ** -53)
        w = self._words(n, np.uint32)
        np.right_shift(w, np.uint32(8), out=w)  # < 2^24: exact in float32
        return torch.from_numpy(w.view(np.int32)).to(torch.float32).add_(0.5).mul_(2.0 ** -24)

    def random(self, n: int) -> Tensor:
        """``n`` uniforms in (0, 1) as float64 (for sampling decisions)."""
        return self.uniform(n, torch.float64)

    def normal(self, shape: tuple[int, ...] | torch.Size, std: float = 1.0,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """Gaussians of standard deviation ``std`` (Box–Muller on keystream uniforms, computed
        in place)."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.uniform(2 * half, torch.float64 if dtype == torch.float64 else torch.float32)
        r, theta = u[:half], u[half:]
        r.log_().mul_(-2.0 * std * std).sqrt_()  # std * sqrt(-2 log u1)
        theta.mul_(2.0 * math.pi)
        out = torch.empty(2 * half, dtype=u.dtype)
        torch.cos(theta, out=out[:half]).mul_(r)
        torch.sin(theta, out=out[half:]).mul_(r)
        return out[:n].to(dtype).view(tuple(shape))


def privacy_generator(reproducible: bool, seed: int, *keys: int | str) -> SecureGenerator:
    """The generator of one privacy-protecting use: secret (a fresh OS key), or with
    ``reproducible`` a keystream keyed by the run's ``seed`` and ``keys`` — the same numbers on
    every rerun, and regenerable by anyone who holds the config."""
    if not reproducible:
        return SecureGenerator()
    key = hashlib.sha256(repr(("shoal-reproducible-noise", seed, *keys)).encode()).digest()
    g = SecureGenerator(key)
    g.secret = False
    return g
