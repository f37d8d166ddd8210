"""``Message``: the one envelope every conversation uses.

Multi-step protocols are message *kinds* (``"train"``, ``"evaluate"``, ``"secagg.share_keys"``,
``"split.forward"``), not new RPCs, so a new algorithm needs no change to any transport.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from .tree import Params

__all__ = ["COORDINATOR", "Message"]

COORDINATOR = "coordinator"
"""The node id of the coordinator (the aggregator of federated learning)."""


@dataclass
class Message:
    """One message from ``src`` to ``dst`` about ``round``.

    ``tensors`` carries params, updates or activations; ``config`` small JSON-able settings;
    ``metrics`` numbers to report; ``error`` is set when the sender failed (a dropout).
    """

    kind: str
    src: str
    dst: str
    round: int
    tensors: Params = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def reply(self, *, tensors: Params | None = None, config: dict[str, Any] | None = None,
              metrics: dict[str, float] | None = None, error: str | None = None) -> Message:
        """The answer to this message: same kind and round, ``src`` and ``dst`` swapped."""
        return Message(self.kind, self.dst, self.src, self.round, tensors or {}, config or {},
                       metrics or {}, error)

    def failed(self, error: str) -> Message:
        """The reply a node that could not answer this message sends (or is deemed to send)."""
        return self.reply(error=error)

    def with_tensors(self, tensors: Params) -> Message:
        """A copy of this message carrying other tensors."""
        return replace(self, tensors=tensors)

    def header(self) -> dict[str, Any]:
        """Everything but the tensor data, as JSON-able values (tensor names, dtypes, shapes)."""
        return {
            "kind": self.kind, "src": self.src, "dst": self.dst, "round": self.round,
            "tensors": _specs_json(_specs(self.tensors)),
            "config": self.config, "metrics": self.metrics, "error": self.error,
        }

    def nbytes(self) -> int:
        """The size this message has on a wire: tensor data plus its JSON header."""
        specs = _specs(self.tensors)
        # Data plus len(json.dumps(header)); the tensor specs' part of the header and the data
        # size follow from the specs (the same for every message of a round) and are measured
        # once: "null" stands in for the specs, then their length is swapped in.
        rest = {"kind": self.kind, "src": self.src, "dst": self.dst, "round": self.round,
                "tensors": None, "config": self.config, "metrics": self.metrics,
                "error": self.error}
        return len(_COMPACT.encode(rest)) - 4 + _specs_bytes(specs)


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps(..., separators=...) as one


Specs = tuple[tuple[str, Any, tuple[int, ...]], ...]


def _specs(tensors: Params) -> Specs:
    return tuple((k, v.dtype, tuple(v.shape)) for k, v in tensors.items())


def _specs_json(specs: Specs) -> dict[str, list[Any]]:
    return {k: [str(d).removeprefix("torch."), list(s)] for k, d, s in specs}


@functools.lru_cache(maxsize=256)
def _specs_bytes(specs: Specs) -> int:
    """The tensors' data bytes plus the length of their specs in the JSON header."""
    data = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in specs)
    return data + len(_COMPACT.encode(_specs_json(specs)))
