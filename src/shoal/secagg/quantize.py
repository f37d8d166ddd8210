"""Clipping and unbiased stochastic quantization into the ring Z_(2^32), and back.

A client's input is a list of float blocks, each with a public bound ``b``. Every value is
clipped to ``[-b, b]`` and scaled to ``z = x * levels / b`` in ``[-levels, levels]``, then
rounded *stochastically*: ``floor(z + u)`` with ``u ~ U[0, 1)``, which rounds up with
probability ``frac(z)``, so ``E[q] = z`` (unbiased) and ``|q - z| < 1``. Negative integers are
stored in two's complement, i.e. modulo 2^32.

The ring is sized so the sum cannot wrap: with at most ``n`` contributors,
``levels = floor((2^31 - 1) / n)``, so ``|sum q| <= n * levels < 2^31`` and the signed 32-bit
reading of the sum modulo 2^32 is the exact integer sum. Dequantizing multiplies by
``b / levels``; the error of a dequantized sum of ``m <= n`` clipped values is below
``m * b / levels`` (each rounding moves a value by less than one step), with standard
deviation at most ``sqrt(m) * b / (2 * levels)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import SecAggError

__all__ = ["RING_BITS", "Block", "dequantize", "error_bound", "levels_for", "quantize"]

RING_BITS = 32
"""Masked vectors live in Z_(2^RING_BITS) (``uint32``; additions wrap for free)."""

Block = tuple[np.ndarray, float | None]
"""A block of float values and the public bound ``b`` its values are clipped to — or, with
bound ``None``, a block of ``uint32`` values already encoded in the ring by the caller (the
noisy integers of distributed DP), which is passed through unchanged."""


def levels_for(n: int) -> int:
    """Quantization levels per unit of bound for at most ``n`` contributors (no wrap)."""
    if n < 1:
        raise SecAggError(f"secagg: the number of contributors must be >= 1 (got {n}).")
    levels = (2 ** (RING_BITS - 1) - 1) // n
    if levels < 1:
        raise SecAggError(f"secagg: {n} contributors do not fit a {RING_BITS}-bit ring.")
    return levels


def quantize(blocks: Sequence[Block], levels: int, rng: np.random.Generator) -> np.ndarray:
    """The blocks clipped, scaled, stochastically rounded and concatenated, as ``uint32``."""
    out = np.empty(sum(np.size(values) for values, _ in blocks), dtype=np.int32)
    offset = 0
    for values, bound in blocks:
        if bound is None:
            ring = np.asarray(values).reshape(-1)
            if ring.dtype != np.uint32:
                raise SecAggError(f"secagg: a block without a bound must hold uint32 values "
                                  f"already in the ring (got {ring.dtype}).")
            out[offset:offset + ring.shape[0]] = ring.view(np.int32)
            offset += ring.shape[0]
            continue
        if not bound > 0:
            raise SecAggError(f"secagg: a block's bound must be > 0 (got {bound}).")
        x = np.asarray(values).reshape(-1)
        z = np.clip(x, -bound, bound, dtype=np.float64)
        z *= levels / bound
        z += rng.random(z.shape[0])
        np.floor(z, out=z)
        np.clip(z, -levels, levels, out=z)  # guards float rounding at the very edge
        np.copyto(out[offset:offset + z.shape[0]], z, casting="unsafe")  # exact integers
        offset += z.shape[0]
    return out.view(np.uint32)


def dequantize(total: np.ndarray, bounds: Sequence[tuple[int, float]],
               levels: int) -> list[np.ndarray]:
    """The float sums of each block from a ``uint32`` ring sum; ``bounds`` lists each block's
    ``(length, bound)`` in order."""
    signed = np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64)
    if sum(n for n, _ in bounds) != signed.shape[0]:
        raise SecAggError(f"secagg: the blocks cover {sum(n for n, _ in bounds)} values but "
                          f"the sum has {signed.shape[0]}.")
    out, offset = [], 0
    for n, bound in bounds:
        out.append(signed[offset:offset + n] * (bound / levels))
        offset += n
    return out


def error_bound(contributors: int, bound: float, levels: int) -> float:
    """The largest possible error of a dequantized sum of ``contributors`` clipped values:
    ``contributors * bound / levels``."""
    return contributors * bound / levels
