"""The cryptographic primitives of secure aggregation, all from the ``cryptography`` package.

* key agreement: X25519 Diffie-Hellman, the shared secret expanded with HKDF-SHA256 into a
  256-bit key bound to a context (the session, the purpose and both parties' ids);
* authenticated encryption of the secret shares: AES-256-GCM, random 96-bit nonce, the
  sender, recipient and session as associated data;
* the mask generator: the AES-256-CTR keystream under the full 256-bit derived key (never a
  short seed), read as ``uint32`` ring elements.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecAggError

__all__ = ["KEY_BYTES", "MIN_MASK_KEY_BYTES", "agree", "decrypt", "encrypt", "load_private",
           "mask_stream", "private_bytes", "public_bytes", "public_of", "random_key"]

KEY_BYTES = 32
"""Bytes of every symmetric key and mask seed (256 bits)."""

MIN_MASK_KEY_BYTES = 16
"""The shortest key the mask generator accepts (128 bits); shoal always uses ``KEY_BYTES``."""

_NONCE = 12
_ZERO_COUNTER = bytes(16)


_ZEROS = [b""]


def _zeros(nbytes: int) -> memoryview:
    """``nbytes`` zero bytes, from one shared read-only buffer grown on demand."""
    if len(_ZEROS[0]) < nbytes:
        _ZEROS[0] = bytes(nbytes)
    return memoryview(_ZEROS[0])[:nbytes]


def random_key() -> bytes:
    """A fresh 256-bit key from the operating system's CSPRNG."""
    return os.urandom(KEY_BYTES)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32 bytes of an X25519 private key."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32 bytes of the public key of an X25519 private key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def load_private(raw: bytes) -> X25519PrivateKey:
    """An X25519 private key from its raw 32 bytes."""
    return X25519PrivateKey.from_private_bytes(raw)


def public_of(raw_private: bytes) -> bytes:
    """The raw public key of a raw private key (to check a reconstructed key)."""
    return public_bytes(load_private(raw_private))


def agree(private: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    """The 256-bit key ``HKDF-SHA256(X25519(private, peer_public), info=context)``."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        shared = private.exchange(peer)
    except ValueError as e:
        raise SecAggError(f"secagg: invalid X25519 public key ({len(peer_public)} bytes): {e}; "
                          "expected the 32 raw bytes a peer advertised.") from e
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=context).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: ``nonce || ciphertext || tag``."""
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`encrypt`'s output; a forged, altered or misaddressed blob is a
    :class:`SecAggError`."""
    try:
        return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], associated)
    except InvalidTag as e:
        raise SecAggError("secagg: an encrypted share failed authentication (altered, or not "
                          "addressed to this client in this session); it cannot be used.") from e


def mask_stream(key: bytes, length: int, out: bytearray | None = None) -> np.ndarray:
    """``length`` pseudorandom ``uint32`` values: the AES-256-CTR keystream under ``key``.

    ``key`` must be the full 256-bit derived key; the counter starts at zero, which is safe
    because every key masks exactly one vector. ``out`` (at least ``4 * length + 15`` bytes)
    is a buffer to reuse; the returned array is a view of it.
    """
    if len(key) < MIN_MASK_KEY_BYTES:
        raise SecAggError(
            f"secagg: the mask generator got a {8 * len(key)}-bit key; expected a "
            f"{8 * KEY_BYTES}-bit key (at least {8 * MIN_MASK_KEY_BYTES} bits). Masks derived "
            "from a short seed can be brute-forced; derive the key with agree() or random_key()."
        )
    if len(key) != KEY_BYTES:
        raise SecAggError(f"secagg: the mask generator needs a {KEY_BYTES}-byte AES-256 key "
                          f"(got {len(key)} bytes).")
    nbytes = 4 * length
    if out is None or len(out) < nbytes + 15:  # update_into wants a block of slack
        out = bytearray(nbytes + 15)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
    encryptor.update_into(_zeros(nbytes), out)  # keystream XOR zeros = keystream
    return np.frombuffer(out, dtype=np.uint32, count=length)
