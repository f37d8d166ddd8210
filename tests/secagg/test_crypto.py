"""Crypto primitives: key agreement, authenticated share encryption, the mask generator's key."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shoal.secagg import crypto
from shoal.secagg.crypto import agree, decrypt, encrypt, mask_stream, public_bytes
from shoal.secagg.errors import SecAggError
from shoal.secagg.protocol import pair_mask_key


def test_key_agreement_is_symmetric_and_bound_to_its_context():
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    k1 = agree(a, public_bytes(b), b"ctx")
    assert k1 == agree(b, public_bytes(a), b"ctx")
    assert len(k1) == 32
    assert k1 != agree(a, public_bytes(b), b"other")


def test_encrypted_shares_are_authenticated():
    key = crypto.random_key()
    blob = encrypt(key, b"share", b"u->v")
    assert decrypt(key, blob, b"u->v") == b"share"
    with pytest.raises(SecAggError, match="failed authentication"):
        decrypt(key, blob, b"u->w")  # misaddressed
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(SecAggError, match="failed authentication"):
        decrypt(key, bytes(tampered), b"u->v")


def test_mask_generator_refuses_a_short_seed():
    """Regression: the mask must come from the full derived 256-bit key, never a short seed."""
    with pytest.raises(SecAggError) as e:
        mask_stream(b"\x01" * 8, 10)
    assert str(e.value) == (
        "secagg: the mask generator got a 64-bit key; expected a 256-bit key (at least 128 "
        "bits). Masks derived from a short seed can be brute-forced; derive the key with "
        "agree() or random_key().")
    with pytest.raises(SecAggError, match="needs a 32-byte AES-256 key"):
        mask_stream(b"\x01" * 16, 10)


def test_every_bit_of_the_256_bit_mask_key_matters():
    """Keys that differ only in their last bit give unrelated masks: nothing truncates the
    key to fewer bits (e.g. a 64-bit numpy seed)."""
    key = bytes(range(32))
    other = key[:-1] + bytes([key[-1] ^ 1])
    a, b = mask_stream(key, 1000).copy(), mask_stream(other, 1000).copy()
    assert (a != b).mean() > 0.99
    assert np.array_equal(a, mask_stream(key, 1000))  # deterministic in the key


def test_pairwise_mask_keys_are_256_bits_and_shared():
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    kab = pair_mask_key(a, public_bytes(b), "s", "u", "v")
    assert len(kab) * 8 == 256
    assert kab == pair_mask_key(b, public_bytes(a), "s", "v", "u")
    assert kab != pair_mask_key(a, public_bytes(b), "s2", "u", "v")  # fresh per session


def test_invalid_public_key_is_a_clear_error():
    with pytest.raises(SecAggError, match="invalid X25519 public key"):
        agree(X25519PrivateKey.generate(), b"short", b"ctx")
