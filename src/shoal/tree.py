"""Math on ``Params``: flat, named dictionaries of tensors (``state_dict``-compatible).

An *update* is something you add to params. Every function here is pure: it leaves its inputs
alone, unless its name ends in ``_`` (in place, for hot loops). ``unflatten`` returns views into
the vector it is given (no copy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import UpdateError

__all__ = [
    "Params",
    "add",
    "add_",
    "check_finite",
    "check_update",
    "clone",
    "dot",
    "equal",
    "flatten",
    "is_finite",
    "map_params",
    "nbytes",
    "norm",
    "numel",
    "params_of",
    "scale",
    "sub",
    "unflatten",
    "weighted_sum",
    "zeros_like",
    "load_params_",
]

Params = dict[str, Tensor]
"""Named tensors: a model's parameters, or an update to them."""


def params_of(model: nn.Module) -> Params:
    """A detached copy of the model's floating-point ``state_dict`` entries.

    Parameters and floating buffers (BatchNorm statistics) are included, since FedAvg averages
    both; integer buffers (``num_batches_tracked``) are not.
    """
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()
    }


def load_params_(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Copy ``params`` into the model's tensors in place (no reallocation)."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in params.items():
            state[name].copy_(value)


def map_params(fn: Callable[[Tensor], Tensor], params: Mapping[str, Tensor]) -> Params:
    """Apply ``fn`` to every tensor."""
    return {k: fn(v) for k, v in params.items()}


def clone(params: Mapping[str, Tensor]) -> Params:
    """A deep copy."""
    return {k: v.detach().clone() for k, v in params.items()}


def zeros_like(params: Mapping[str, Tensor]) -> Params:
    """Zeros of the same names, shapes and dtypes."""
    return {k: torch.zeros_like(v) for k, v in params.items()}


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    """``a + b``, name by name."""
    return {k: a[k] + b[k] for k in a}


def add_(a: Params, b: Mapping[str, Tensor], alpha: float = 1.0) -> Params:
    """``a += alpha * b`` in place; returns ``a``."""
    for k, v in a.items():
        v.add_(b[k], alpha=alpha)
    return a


def sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    """``a - b``, name by name."""
    return {k: a[k] - b[k] for k in a}


def scale(params: Mapping[str, Tensor], factor: float) -> Params:
    """``factor * params``."""
    return {k: v * factor for k, v in params.items()}


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """The inner product over all tensors, as if flattened into one vector."""
    return float(sum(torch.sum(a[k].double() * b[k].double()) for k in a))


def norm(params: Mapping[str, Tensor]) -> float:
    """The global L2 norm, as if all tensors were one vector (computed in float64)."""
    if not params:
        return 0.0
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(v.double()) for v in params.values()])
    ))


def weighted_sum(updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> Params:
    """``sum_i weights[i] * updates[i]``, accumulated in the updates' dtype, in order."""
    if len(updates) != len(weights):
        raise ValueError(
            f"weighted_sum: got {len(updates)} updates but {len(weights)} weights; "
            "pass one weight per update."
        )
    if not updates:
        raise ValueError("weighted_sum: no updates to sum; pass at least one.")
    out = {k: v * weights[0] for k, v in updates[0].items()}
    for u, w in zip(updates[1:], weights[1:], strict=True):
        for k, acc in out.items():
            acc.add_(u[k], alpha=w)
    return out


def numel(params: Mapping[str, Tensor]) -> int:
    """The total number of scalars."""
    return sum(v.numel() for v in params.values())


def nbytes(params: Mapping[str, Tensor]) -> int:
    """The total size of the tensors' data in bytes."""
    return sum(v.numel() * v.element_size() for v in params.values())


def is_finite(params: Mapping[str, Tensor]) -> bool:
    """True when no tensor holds NaN or infinity."""
    return all(bool(torch.isfinite(v).all()) for v in params.values() if v.is_floating_point())


def equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """True when both have the same names and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flatten(params: Mapping[str, Tensor]) -> tuple[Tensor, list[tuple[str, torch.Size, torch.dtype]]]:
    """One 1-D vector of all tensors (in name order of ``params``) and the spec to undo it."""
    spec = [(k, v.shape, v.dtype) for k, v in params.items()]
    if not spec:
        return torch.zeros(0), spec
    # torch.cat promotes mixed dtypes to the widest one.
    return torch.cat([v.reshape(-1) for v in params.values()]), spec


def unflatten(vector: Tensor, spec: Iterable[tuple[str, torch.Size, torch.dtype]]) -> Params:
    """Inverse of :func:`flatten`."""
    spec = list(spec)
    # Check the length first: a too-short vector would otherwise fail inside reshape.
    total = sum(math.prod(shape) for _, shape, _ in spec)
    if total != vector.numel():
        raise ValueError(
            f"unflatten: the spec covers {total} values but the vector has {vector.numel()}."
        )
    out: Params = {}
    offset = 0
    for name, shape, dtype in spec:
        n = math.prod(shape)
        out[name] = vector[offset:offset + n].reshape(shape).to(dtype)
        offset += n
    return out


def check_update(reference: Mapping[str, Tensor], update: Mapping[str, Tensor],
                 *, what: str = "update", finite: bool = True) -> None:
    """Raise :class:`UpdateError` unless ``update`` matches ``reference`` and is finite.

    Checks the tensor names, then each tensor's shape and dtype, then (unless ``finite`` is
    false: a caller that checks many updates at once) that every value is finite. The message
    names the first problem found.
    """
    missing = [k for k in reference if k not in update]
    extra = [k for k in update if k not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if extra:
            parts.append(f"unexpected {_names(extra)}")
        raise UpdateError(
            f"{what} does not match the model: {'; '.join(parts)}. "
            "Send one tensor per model parameter, named as in the model's state_dict."
        )
    for k, ref in reference.items():
        got = update[k]
        if not isinstance(got, Tensor):
            raise UpdateError(f"{what}: '{k}' is a {type(got).__name__}, expected a tensor.")
        if got.shape != ref.shape:
            raise UpdateError(
                f"{what}: '{k}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}."
            )
        if got.dtype != ref.dtype:
            raise UpdateError(f"{what}: '{k}' has dtype {got.dtype}, expected {ref.dtype}.")
        # A finite sum proves every value finite, and costs far less than isfinite().all();
        # only a non-finite sum (or an overflowing one) needs the exact check.
        if finite and got.is_floating_point() and not math.isfinite(float(got.sum())):
            check_finite(k, got, what=what)


def check_finite(name: str, tensor: Tensor, *, what: str = "update") -> None:
    """Raise :class:`UpdateError` if ``tensor`` (the update's ``name``) holds NaN or inf."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise UpdateError(
            f"{what}: '{name}' holds {bad} non-finite value(s) (NaN or inf); "
            "expected finite numbers. Lower the learning rate or clip the update."
        )


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
