"""The error of secure aggregation: a protocol step that cannot go on safely."""

from __future__ import annotations

from ..errors import RoundError

__all__ = ["SecAggError"]


class SecAggError(RoundError):
    """Secure aggregation cannot go on: too few survivors to unmask, a malformed or
    inconsistent protocol message, a key too short, or a share that fails to decrypt."""
