"""One seed fixes everything: partitioning, sampling, initialisation and training.

Randomness is never drawn from a shared, stateful generator. Each use derives its own
generator from the run's seed and a tuple of keys (purpose, round, client id), so that the
stream a client sees in round 7 does not depend on which clients ran before it, on the
executor, or on whether the run was resumed from a checkpoint.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["derive_seed", "numpy_rng", "torch_generator"]


def _key_int(key: int | str) -> int:
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"derive_seed: keys must be >= 0 (got {key}).")
        return key
    # A stable hash: Python's hash() of str changes between processes.
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _words(key: int) -> list[int]:
    # The 32-bit little-endian words NumPy's SeedSequence makes of a non-negative int (at least
    # one), so the entropy can be handed to it as a uint32 array: same seed, half the time.
    words = [key & 0xFFFFFFFF]
    key >>= 32
    while key:
        words.append(key & 0xFFFFFFFF)
        key >>= 32
    return words


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (ints or strings), stable everywhere:
    the first word of ``np.random.SeedSequence([seed, *keys])``'s state, shifted right by one
    (strings enter as their 64-bit BLAKE2b hash)."""
    words = [w for k in (seed, *keys) for w in _words(_key_int(k))]
    lo, hi = np.random.SeedSequence(np.array(words, dtype=np.uint32)).generate_state(2).tolist()
    return (lo | hi << 32) >> 1  # generate_state(1, np.uint64), without NumPy's errstate


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A NumPy generator for ``(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU torch generator for ``(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
