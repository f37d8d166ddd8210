"""Shamir secret sharing over a prime field (Shamir 1979).

A secret ``s`` in GF(p) is the constant term of a random polynomial ``f`` of degree ``t - 1``;
share ``i`` is ``(x_i, f(x_i))``. Any ``t`` shares give ``s`` back by Lagrange interpolation at
zero; any ``t - 1`` shares are uniformly distributed whatever ``s`` is, so they reveal nothing.
The default field is GF(2^521 - 1) (a Mersenne prime), large enough for 256-bit secrets (X25519
private keys and mask seeds). Coefficients come from the operating system's CSPRNG.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Sequence

from .errors import SecAggError

__all__ = ["PRIME", "SHARE_BYTES", "combine", "combine_bytes", "interpolate", "recover",
           "split", "split_bytes"]

PRIME = 2**521 - 1
"""The field's modulus: the Mersenne prime 2^521 - 1."""

SHARE_BYTES = (PRIME.bit_length() + 7) // 8
"""Bytes of one share value in GF(PRIME) (66)."""


def split(secret: int, xs: Sequence[int], threshold: int, prime: int = PRIME) -> list[int]:
    """Shares ``f(x)`` for each ``x`` in ``xs`` of a random degree ``threshold - 1`` polynomial
    with ``f(0) = secret``."""
    if not 0 <= secret < prime:
        raise SecAggError(f"shamir: the secret must be in [0, {prime}) (got a "
                          f"{secret.bit_length()}-bit value); use a larger prime.")
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"shamir: threshold must be in [1, {len(xs)}] for {len(xs)} shares "
                          f"(got {threshold}).")
    if len(set(x % prime for x in xs)) != len(xs) or any(x % prime == 0 for x in xs):
        raise SecAggError("shamir: share points must be distinct and nonzero in the field.")
    coeffs = [secret] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % prime
        shares.append(y)
    return shares


def interpolate(shares: Sequence[tuple[int, int]], at: int, prime: int = PRIME) -> int:
    """``f(at)`` of the polynomial through the ``(x, f(x))`` points (Lagrange)."""
    if not shares:
        raise SecAggError("shamir: no shares to combine; expected at least the threshold.")
    xs = [x % prime for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise SecAggError("shamir: two shares have the same point; expected distinct points.")
    value = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (at - xj) % prime
                den = den * (xi - xj) % prime
        value = (value + yi * num * pow(den, -1, prime)) % prime
    return value


def combine(shares: Sequence[tuple[int, int]], prime: int = PRIME) -> int:
    """The secret ``f(0)`` from ``(x, f(x))`` points (Lagrange interpolation at zero). Pass at
    least ``threshold`` shares; with fewer the result is a uniformly random field element."""
    return interpolate(shares, 0, prime)


def split_bytes(secret: bytes, xs: Sequence[int], threshold: int) -> list[bytes]:
    """:func:`split` of a byte string (at most 65 bytes), shares as ``SHARE_BYTES`` bytes."""
    values = split(int.from_bytes(secret, "big"), xs, threshold)
    return [v.to_bytes(SHARE_BYTES, "big") for v in values]


def combine_bytes(shares: Sequence[tuple[int, bytes]], length: int) -> bytes:
    """:func:`combine` of byte shares back to a ``length``-byte secret."""
    value = combine([(x, int.from_bytes(y, "big")) for x, y in shares])
    if value.bit_length() > 8 * length:
        raise SecAggError(f"shamir: the shares combine to a value longer than {length} bytes; "
                          "they are inconsistent (tampered, or from different secrets).")
    return value.to_bytes(length, "big")


def recover(shares: Sequence[tuple[str, int, bytes]], threshold: int, length: int,
            check: Callable[[bytes], bool], attempts: int = 256,
            ) -> tuple[bytes | None, list[str]]:
    """Rebuild a ``length``-byte secret from ``(sender, x, share)`` triples when some shares may
    be wrong: the secret of the first ``threshold`` shares that passes ``check`` (a commitment),
    trying other subsets of ``threshold`` shares (at most ``attempts``) when it does not.

    Returns ``(secret, bad)``: ``bad`` names the senders whose shares do not lie on the
    polynomial of the secret found (a flipped bit, a crafted share); ``secret`` is ``None``
    when no subset passes (then every sender is a suspect).
    """
    if len(shares) < threshold:
        return None, []
    points = [(x, int.from_bytes(y, "big")) for _, x, y in shares]
    for tried, subset in enumerate(itertools.combinations(range(len(shares)), threshold)):
        if tried >= attempts:
            break
        chosen = [points[i] for i in subset]
        value = combine(chosen)
        if value.bit_length() > 8 * length:
            continue
        secret = value.to_bytes(length, "big")
        if not check(secret):
            continue
        bad = [shares[i][0] for i in range(len(shares)) if i not in subset
               and interpolate(chosen, points[i][0]) != points[i][1] % PRIME]
        return secret, bad
    return None, sorted({s for s, _, _ in shares})
