"""clip_by_norm: never increases a norm, clips to max_norm, exact config errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal import tree
from shoal.aggregate import Stage, clip_by_norm
from shoal.errors import ConfigError
from shoal.types import ClientInfo, RoundInfo

from ._strategies import update_st

INFO = ClientInfo("c0", round=0, seed=0)


@settings(deadline=None, max_examples=60)
@given(update_st(lo=-1e4, hi=1e4), st.floats(1e-3, 1e3))
def test_clip_by_norm_never_increases_a_norm(update, max_norm):
    before = tree.clone(update)
    clipped = clip_by_norm(max_norm).client(update, {}, INFO)
    n0, n1 = tree.norm(update), tree.norm(clipped)
    assert n1 <= n0
    # Scaling by max_norm / n0 in float32 rounds each coordinate once: the clipped norm is
    # max_norm to within a few float32 ulps (it may exceed it by ~1e-7 relative).
    assert n1 <= max_norm * (1 + 1e-6)
    if n0 > max_norm:
        assert abs(n1 - max_norm) <= 1e-6 * max_norm
    else:
        assert tree.equal(clipped, update)  # at or under the bound: untouched
    assert tree.equal(update, before)  # pure


def test_clip_by_norm_by_hand():
    # norm([3, 4], [12]) = 13 -> scaled by 2.6 / 13 = 0.2
    x = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[12.0]])}
    got = clip_by_norm(2.6).client(x, {}, INFO)
    assert torch.allclose(got["a"], torch.tensor([0.6, 0.8]), rtol=1e-6, atol=0)
    assert torch.allclose(got["b"], torch.tensor([[2.4]]), rtol=1e-6, atol=0)
    assert tree.equal(clip_by_norm(13).client(x, {}, INFO), x)  # exactly at the bound
    assert tree.equal(clip_by_norm(100).client(x, {}, INFO), x)
    zero = {"a": torch.zeros(3)}
    assert tree.equal(clip_by_norm(1).client(zero, {}, INFO), zero)


@pytest.mark.parametrize("max_norm, message", [
    (0, "clip_by_norm: max_norm must be > 0 (got 0)."),
    (-1.5, "clip_by_norm: max_norm must be > 0 (got -1.5)."),
    (float("nan"), "clip_by_norm: max_norm must be > 0 (got nan)."),
])
def test_clip_by_norm_bad_max_norm(max_norm, message):
    with pytest.raises(ConfigError) as e:
        clip_by_norm(max_norm)
    assert str(e.value) == message


def test_clip_by_norm_bad_runs_at():
    with pytest.raises(ConfigError) as e:
        clip_by_norm(1.0, runs_at="server")  # type: ignore[arg-type]
    assert str(e.value) == (
        "clip_by_norm: runs_at must be 'client' or 'coordinator' (got 'server')."
    )


def test_clip_by_norm_repr_and_sides():
    assert repr(clip_by_norm(1.0)) == "clip_by_norm(1)"
    assert repr(clip_by_norm(0.5, runs_at="coordinator")) == (
        "clip_by_norm(0.5, runs_at='coordinator')"
    )
    assert clip_by_norm(1.0).runs_at == "client"
    # The server half is the identity.
    agg = {"a": torch.tensor([10.0])}
    out, state, metrics = clip_by_norm(1.0).server(agg, {}, RoundInfo(0, 0, 1, 1, 1))
    assert out is agg and state == {} and metrics == {}


def test_base_stage_is_the_identity():
    s = Stage()
    x = {"a": torch.tensor([1.0, 2.0])}
    assert s.runs_at == "client"
    assert s.init() == {} and s.client_config({}) == {}
    assert s.client(x, {}, INFO) is x
    assert s.server(x, {}, RoundInfo(0, 0, 1, 1, 1)) == (x, {}, {})
