"""One seed fixes everything: partitioning, sampling, initialisation and training.

Randomness is never drawn from a shared, stateful generator. Each use derives its own
generator from the run's seed and a tuple of keys (purpose, round, client id), so that the
stream a client sees in round 7 does not depend on which clients ran before it, on the
executor, or on whether the run was resumed from a checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["derive_seed", "derive_seeds", "numpy_rng", "torch_generator"]


def _key_int(key: int | str) -> int:
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"derive_seed: keys must be >= 0 (got {key}).")
        return key
    # A stable hash: Python's hash() of str changes between processes.
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _words(key: int) -> tuple[int, ...]:
    # The 32-bit little-endian words NumPy's SeedSequence makes of a non-negative int (at least
    # one), so the entropy can be handed to it as a uint32 array: same seed, half the time.
    if 0 <= key <= 0xFFFFFFFF:
        return (key,)
    words = [key & 0xFFFFFFFF]
    key >>= 32
    while key:
        words.append(key & 0xFFFFFFFF)
        key >>= 32
    return tuple(words)


@functools.lru_cache(maxsize=1 << 16)
def _str_words(key: str) -> tuple[int, ...]:
    # Strings repeat (purposes, client ids): hash each once.
    return _words(_key_int(key))


def _key_words(key: int | str) -> tuple[int, ...]:
    if isinstance(key, str):
        return _str_words(key)
    return _words(_key_int(key))


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (ints or strings), stable everywhere:
    the first word of ``np.random.SeedSequence([seed, *keys])``'s state, shifted right by one
    (strings enter as their 64-bit BLAKE2b hash)."""
    words = list(_key_words(seed))
    for k in keys:
        words += _key_words(k)
    return _seed_of_words(words)


def _seed_of_words(words: list[int]) -> int:
    lo, hi = np.random.SeedSequence(np.array(words, dtype=np.uint32)).generate_state(2).tolist()
    return (lo | hi << 32) >> 1  # generate_state(1, np.uint64), without NumPy's errstate


def derive_seeds(rows: Sequence[Sequence[int | str]]) -> list[int]:
    """``[derive_seed(*row) for row in rows]``, computed together: NumPy's SeedSequence hash
    (the pool mixing of ``numpy.random.SeedSequence``, tested equal to it) on uint32 arrays,
    one column per row, so that a cohort's seeds cost a few hundred array operations instead of
    one SeedSequence each. Small groups of rows go to SeedSequence itself."""
    words = [[w for k in row for w in _key_words(k)] for row in rows]
    out = [0] * len(rows)
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(words):
        groups.setdefault(len(w), []).append(i)
    for idx in groups.values():
        if len(idx) < _VECTOR_MIN:
            for i in idx:
                out[i] = _seed_of_words(words[i])
            continue
        lo, hi = _seed_sequence_state(np.array([words[i] for i in idx], dtype=np.uint32).T)
        for i, a, b in zip(idx, lo.tolist(), hi.tolist(), strict=True):
            out[i] = (a | b << 32) >> 1
    return out


_VECTOR_MIN = 8  # rows from which derive_seeds hashes them together
# NumPy's SeedSequence constants (numpy/random/bit_generator.pyx): a pool of four words.
_POOL = 4
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _SHIFT = np.uint32(0xCA01F9DD), np.uint32(0x4973F715), np.uint32(16)


def _hash(v: np.ndarray, h: int, mult: int) -> tuple[np.ndarray, int]:
    """SeedSequence's hash of the words ``v`` with the running constant ``h`` (its mixing
    hash with ``_MULT_A``, its output hash with ``_MULT_B``): the hashed words and the next
    ``h``."""
    v = v ^ np.uint32(h)
    h = (h * mult) & 0xFFFFFFFF
    v = v * np.uint32(h)
    return v ^ (v >> _SHIFT), h


def _seed_sequence_state(entropy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two words of ``SeedSequence(entropy[:, j]).generate_state(2)`` for every
    column ``j`` of ``entropy`` (uint32, ``(n_words, m)``)."""
    h = _INIT_A

    def hashmix(v: np.ndarray) -> np.ndarray:
        nonlocal h
        v, h = _hash(v, h, _MULT_A)
        return v

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r: np.ndarray = _MIX_L * x - _MIX_R * y
        return r ^ (r >> _SHIFT)

    n, m = entropy.shape
    zero = np.zeros(m, np.uint32)
    pool = [hashmix(entropy[i] if i < n else zero) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, n):
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    first, h = _hash(pool[0], _INIT_B, _MULT_B)
    second, _ = _hash(pool[1], h, _MULT_B)
    return first, second


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A NumPy generator for ``(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU torch generator for ``(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
