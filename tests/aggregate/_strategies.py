"""Hypothesis strategies shared by the aggregation tests: small named float32 updates."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

SHAPES = {"w": (2, 3), "b": (3,), "s": ()}


def tensor_st(shape: tuple[int, ...], lo: float = -100.0, hi: float = 100.0) -> st.SearchStrategy:
    elements = st.floats(lo, hi, width=32, allow_subnormal=False)
    return arrays(np.float32, shape, elements=elements).map(lambda a: torch.from_numpy(a.copy()))


def update_st(shapes: dict[str, tuple[int, ...]] = SHAPES, lo: float = -100.0,
              hi: float = 100.0) -> st.SearchStrategy:
    return st.fixed_dictionaries({k: tensor_st(s, lo, hi) for k, s in shapes.items()})


def updates_st(min_size: int, max_size: int, **kw) -> st.SearchStrategy:
    return st.lists(update_st(**kw), min_size=min_size, max_size=max_size)


def random_updates(n: int, seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES,
                   dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    """``n`` Gaussian updates from a seed (for properties that need untied values)."""
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}
            for _ in range(n)]
