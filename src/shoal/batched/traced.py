"""Replaying a batched training step as the graph of tensor operations it ran.

The vectorized trainer's step is a Python function: ``torch.func.vmap`` over
``functional_call`` of the model, autograd, the fused layers' ``vmap`` rules, the SGD step. For
a cohort of small models a step's arithmetic takes a few milliseconds and that Python costs
about 1.5 ms of it, every step. :class:`TracedStep` traces the function once per input
signature with :func:`torch.fx.experimental.proxy_tensor.make_fx` (on fake tensors: no
arithmetic, and a model whose control flow depends on tensor values cannot be traced) into the
flat sequence of ATen operations vmap and autograd dispatched, in-place updates of the inputs
included, and replays that sequence afterwards: the same operations in the same order on the
same tensors, so the results are bit-identical to calling the function.

A signature is seen once before it is traced (rare shapes, e.g. the last steps of a cohort of
unequal clients, stay eager), at most ``max_graphs`` graphs are kept, and the first failure to
trace turns tracing off for good (logged), leaving the function to run as it is. Python side
effects of the function other than on its tensor arguments are not replayed: the caller passes
every tensor the step reads or writes as an argument, and everything else that shapes the graph
(Python numbers, flags) in ``key``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten

__all__ = ["TracedStep"]

log = logging.getLogger(__name__)


def _signature(args: tuple[Any, ...]) -> Hashable:
    """What a traced graph depends on besides the caller's key: the structure of ``args`` and
    each tensor's shape, strides, dtype and device."""
    leaves, spec = tree_flatten(args)
    return str(spec), tuple(
        (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor)
        else (type(a), a) for a in leaves)


class TracedStep:
    """Calls ``fn(*args)``, or replays the graph traced from it for the same ``key`` and
    argument signature; see the module docstring."""

    def __init__(self, fn: Callable[..., Any], *, enabled: bool = True, max_graphs: int = 8):
        self.fn = fn
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.graphs: dict[Hashable, torch.fx.GraphModule] = {}
        self._seen: set[Hashable] = set()
        self.failure: str | None = None  # why tracing was turned off

    def __call__(self, key: Hashable, *args: Any) -> Any:
        """``fn(*args)``: by replay when a graph for ``key`` and these arguments exists."""
        if not self.enabled:
            return self.fn(*args)
        sig = (key, _signature(args))
        graph = self.graphs.get(sig)
        if graph is not None:
            return graph(*args)
        if sig not in self._seen or len(self.graphs) >= self.max_graphs:
            self._seen.add(sig)
            return self.fn(*args)
        try:
            graph = make_fx(lambda *a: self.fn(*a), tracing_mode="fake")(*args)
        except Exception as e:  # noqa: BLE001 - any failure: run the function as it is
            self.enabled = False
            self.failure = f"{type(e).__name__}: {e}"
            log.info("the vectorized step cannot be traced (%s); it runs eagerly",
                     self.failure)
            return self.fn(*args)
        self.graphs[sig] = _without_aliases(graph)
        return self.graphs[sig](*args)


def _without_aliases(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph`` without the operations that only alias their input (``detach``, a permute to
    the same order, a view to the same shape): each costs a Python call on replay and computes
    nothing."""
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        dims = node.args[1] if node.target is torch.ops.aten.permute.default else None
        if node.target is torch.ops.aten.detach.default \
                or (dims is not None and list(dims) == list(range(len(dims)))) \
                or (node.target is torch.ops.aten.view.default and _same_layout(node)):
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.recompile()
    return graph


def _same_layout(node: torch.fx.Node) -> bool:
    """Whether ``node``'s (traced, fake) output has its first argument's shape and strides."""
    src = node.args[0]
    a = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    b = node.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
        and a.shape == b.shape and a.stride() == b.stride()
