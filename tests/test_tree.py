"""tree.py: dict-of-tensor math against plain torch, and the update checks' exact messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from shoal import tree
from shoal.errors import UpdateError

SHAPES = {"conv.w": (2, 1, 3), "fc.w": (3, 2), "fc.b": (3,), "scale": ()}


def _tensor(shape: tuple[int, ...], lo: float = -100.0, hi: float = 100.0) -> st.SearchStrategy:
    elements = st.floats(lo, hi, width=32, allow_subnormal=False)
    return arrays(np.float32, shape, elements=elements).map(lambda a: torch.from_numpy(a.copy()))


def params_st(shapes: dict[str, tuple[int, ...]] = SHAPES) -> st.SearchStrategy:
    return st.fixed_dictionaries({k: _tensor(s) for k, s in shapes.items()})


def _flat64(p: dict[str, torch.Tensor], names=None) -> torch.Tensor:
    return torch.cat([p[k].double().reshape(-1) for k in (names or p)])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# --- arithmetic against plain torch ---------------------------------------------------------

@settings(deadline=None, max_examples=50)
@given(params_st(), params_st(), st.floats(-10, 10, allow_subnormal=False))
def test_add_sub_scale_match_torch(a, b, factor):
    a0, b0 = tree.clone(a), tree.clone(b)
    _same(tree.add(a, b), {k: a[k] + b[k] for k in a})
    _same(tree.sub(a, b), {k: a[k] - b[k] for k in a})
    _same(tree.scale(a, factor), {k: a[k] * factor for k in a})
    # Pure: the inputs are left alone.
    _same(a, a0)
    _same(b, b0)


def test_add_in_place_returns_its_first_argument():
    a = {"w": torch.tensor([1.0, 2.0])}
    ptr = a["w"].data_ptr()
    out = tree.add_(a, {"w": torch.tensor([0.5, -1.0])}, alpha=2.0)
    assert out is a and a["w"].data_ptr() == ptr
    assert torch.equal(a["w"], torch.tensor([2.0, 0.0]))


@settings(deadline=None, max_examples=50)
@given(st.lists(params_st(), min_size=1, max_size=5),
       st.lists(st.floats(0, 50, allow_subnormal=False), min_size=5, max_size=5))
def test_weighted_sum_matches_torch_in_order(updates, ws):
    weights = ws[:len(updates)]
    before = [tree.clone(u) for u in updates]
    got = tree.weighted_sum(updates, weights)
    # The same accumulation, written out with plain torch: bit-identical.
    ref = {}
    for k in updates[0]:
        acc = updates[0][k] * weights[0]
        for u, w in zip(updates[1:], weights[1:], strict=True):
            acc = acc.add(u[k], alpha=w)
        ref[k] = acc
    _same(got, ref)
    # ...and close to the float64 sum.
    for k in got:
        exact = sum(w * u[k].double() for u, w in zip(updates, weights, strict=True))
        bound = sum(w * u[k].double().abs() for u, w in zip(updates, weights, strict=True))
        assert torch.all((got[k].double() - exact).abs() <= 1e-6 * bound + 1e-30), k
    for u, b in zip(updates, before, strict=True):
        _same(u, b)


def test_weighted_sum_exact_values_and_errors():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([5.0, 6.0])}
    assert torch.equal(tree.weighted_sum([a, b], [1.0, 3.0])["w"], torch.tensor([16.0, 20.0]))
    with pytest.raises(ValueError) as e:
        tree.weighted_sum([a, b], [1.0])
    assert str(e.value) == (
        "weighted_sum: got 2 updates but 1 weights; pass one weight per update."
    )
    with pytest.raises(ValueError) as e:
        tree.weighted_sum([], [])
    assert str(e.value) == "weighted_sum: no updates to sum; pass at least one."


@settings(deadline=None, max_examples=50)
@given(params_st(), params_st())
def test_norm_and_dot_match_torch_on_the_flat_vector(a, b):
    fa, fb = _flat64(a), _flat64(b, names=list(a))  # b's keys may come in another order
    assert isinstance(tree.norm(a), float) and isinstance(tree.dot(a, b), float)
    assert math.isclose(tree.norm(a), float(torch.linalg.vector_norm(fa)),
                        rel_tol=1e-12, abs_tol=1e-300)
    # dot accumulates per tensor, then across tensors: same value up to float64 rounding.
    assert math.isclose(tree.dot(a, b), float(torch.dot(fa, fb)),
                        rel_tol=1e-12, abs_tol=1e-9 * float(fa.abs() @ fb.abs()) + 1e-300)
    assert math.isclose(tree.dot(a, a), tree.norm(a) ** 2, rel_tol=1e-12, abs_tol=1e-300)


def test_norm_and_dot_exact_values():
    p = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0, 0.0]]), "c": torch.tensor(12.0)}
    assert tree.norm(p) == 13.0
    assert tree.dot(p, p) == 169.0
    assert tree.norm({}) == 0.0
    assert tree.dot({}, {}) == 0.0


# --- flatten / unflatten ----------------------------------------------------------------------

@settings(deadline=None, max_examples=50)
@given(params_st())
def test_flatten_unflatten_round_trip_mixed_shapes(p):
    vec, spec = tree.flatten(p)
    assert vec.shape == (tree.numel(p),)
    assert spec == [(k, v.shape, v.dtype) for k, v in p.items()]
    _same(tree.unflatten(vec, spec), p)


def test_flatten_unflatten_round_trip_mixed_dtypes_and_empty():
    p = {
        "half": torch.tensor([[1.5, -2.0]], dtype=torch.float16),
        "single": torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32),
        "double": torch.tensor(1 / 3, dtype=torch.float64),
        "empty": torch.zeros(0, 2),
    }
    vec, spec = tree.flatten(p)
    assert vec.dtype == torch.float64  # promoted to the widest dtype, so nothing is lost
    _same(tree.unflatten(vec, spec), p)
    vec, spec = tree.flatten({})
    assert vec.numel() == 0 and spec == []
    assert tree.unflatten(vec, spec) == {}


@pytest.mark.parametrize("length", [4, 9])
def test_unflatten_wrong_length(length):
    _, spec = tree.flatten({"a": torch.ones(2, 3), "b": torch.ones(2)})
    with pytest.raises(ValueError) as e:
        tree.unflatten(torch.ones(length), spec)
    assert str(e.value) == f"unflatten: the spec covers 8 values but the vector has {length}."


# --- check_update / is_finite -----------------------------------------------------------------

REF = {"fc.w": torch.zeros(2, 3), "fc.b": torch.zeros(3)}


def _error(update, **kw) -> str:
    with pytest.raises(UpdateError) as e:
        tree.check_update(REF, update, **kw)
    return str(e.value)


def test_check_update_accepts_a_matching_update():
    tree.check_update(REF, {"fc.b": torch.ones(3), "fc.w": torch.ones(2, 3)})


def test_check_update_missing_and_unexpected_names():
    assert _error({"fc.w": torch.zeros(2, 3)}) == (
        "update does not match the model: missing 'fc.b'. "
        "Send one tensor per model parameter, named as in the model's state_dict."
    )
    assert _error({**REF, "extra": torch.zeros(1)}) == (
        "update does not match the model: unexpected 'extra'. "
        "Send one tensor per model parameter, named as in the model's state_dict."
    )
    assert _error({"fc.w": torch.zeros(2, 3), "fc.bias": torch.zeros(3)},
                  what="client 7's update") == (
        "client 7's update does not match the model: missing 'fc.b'; unexpected 'fc.bias'. "
        "Send one tensor per model parameter, named as in the model's state_dict."
    )
    many = {f"p{i}": torch.zeros(1) for i in range(6)}
    with pytest.raises(UpdateError) as e:
        tree.check_update(many, {})
    assert str(e.value) == (
        "update does not match the model: missing 'p0', 'p1', 'p2', 'p3' and 2 more. "
        "Send one tensor per model parameter, named as in the model's state_dict."
    )


def test_check_update_shape_dtype_type():
    assert _error({"fc.w": torch.zeros(3, 2), "fc.b": torch.zeros(3)}) == (
        "update: 'fc.w' has shape (3, 2), expected (2, 3)."
    )
    assert _error({"fc.w": torch.zeros(2, 3), "fc.b": torch.zeros(3, dtype=torch.float64)}) == (
        "update: 'fc.b' has dtype torch.float64, expected torch.float32."
    )
    assert _error({"fc.w": [[0.0] * 3] * 2, "fc.b": torch.zeros(3)}) == (
        "update: 'fc.w' is a list, expected a tensor."
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_update_non_finite(bad):
    w = torch.zeros(2, 3)
    w[0, 1] = bad
    w[1, 2] = bad
    assert _error({"fc.w": w, "fc.b": torch.zeros(3)}, what="round 3 update") == (
        "round 3 update: 'fc.w' holds 2 non-finite value(s) (NaN or inf); expected finite "
        "numbers. Lower the learning rate or clip the update."
    )
    assert not tree.is_finite({"fc.w": w})


def test_is_finite():
    assert tree.is_finite({"a": torch.ones(3), "n": torch.tensor([2**62])})
    assert tree.is_finite({})
    assert not tree.is_finite({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])})
    assert not tree.is_finite({"b": torch.tensor([float("-inf")], dtype=torch.float16)})


# --- models -----------------------------------------------------------------------------------

def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    m.train()
    m(torch.randn(8, 3))  # move the BatchNorm statistics away from their defaults
    return m


def test_params_of_includes_floating_buffers_only():
    m = _model()
    p = tree.params_of(m)
    assert list(p) == ["0.weight", "0.bias", "1.weight", "1.bias",
                       "1.running_mean", "1.running_var"]
    assert "1.num_batches_tracked" in m.state_dict()
    sd = m.state_dict()
    for k, v in p.items():
        assert torch.equal(v, sd[k])
        assert not v.requires_grad
        assert v.data_ptr() != sd[k].data_ptr()  # a copy, not a view
    p["0.weight"].add_(1.0)
    p["1.running_mean"].add_(1.0)
    assert not torch.equal(p["0.weight"], m.state_dict()["0.weight"])
    assert not torch.equal(p["1.running_mean"], m.state_dict()["1.running_mean"])


def test_load_params_in_place_round_trip():
    m = _model()
    before = m.state_dict()
    ptrs = {k: v.data_ptr() for k, v in before.items()}
    nbt = int(before["1.num_batches_tracked"])
    new = {k: torch.full_like(v, float(i)) for i, (k, v) in enumerate(tree.params_of(m).items())}
    tree.load_params_(m, new)
    after = m.state_dict()
    _same(tree.params_of(m), new)
    assert {k: v.data_ptr() for k, v in after.items()} == ptrs  # no reallocation
    assert int(after["1.num_batches_tracked"]) == nbt
    assert m[0].weight.requires_grad  # still a trainable Parameter
    new["0.bias"].add_(5.0)  # the model holds a copy, not the caller's tensor
    assert not torch.equal(m[0].bias.detach(), new["0.bias"])


def test_small_helpers():
    p = {"a": torch.ones(2, 3), "b": torch.ones(4, dtype=torch.float64)}
    assert tree.numel(p) == 10
    assert tree.nbytes(p) == 6 * 4 + 4 * 8
    z = tree.zeros_like(p)
    assert all(torch.equal(z[k], torch.zeros_like(p[k])) and z[k].dtype == p[k].dtype for k in p)
    c = tree.clone(p)
    assert tree.equal(c, p) and all(c[k].data_ptr() != p[k].data_ptr() for k in p)
    assert not tree.equal(c, {"a": p["a"]})
    assert not tree.equal(c, tree.map_params(lambda v: v * 2, p))
    assert tree.equal(tree.map_params(lambda v: v * 2, p), tree.add(p, p))
