"""Server optimizers: hand-computed updates (Reddi et al. 2021, Algorithm 2) and torch.optim.

The hand-computed cases use numbers whose square roots are exact (0.25, 6.25, 1.69, 72.25...),
so every intermediate ``m``, ``v`` and ``x`` below can be checked on paper.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.aggregate import adagrad, adam, momentum, sgd, yogi
from shoal.aggregate.server_opt import Adaptive
from shoal.errors import ConfigError

F64 = torch.float64


def t(*xs: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype)


def _rounds(opt, x0: torch.Tensor, deltas: list[torch.Tensor]):
    """Apply ``opt`` to the params ``{"x": x0}`` once per delta; every (params, state) after."""
    params = {"x": x0.clone()}
    state = opt.init(params)
    out = []
    for d in deltas:
        params, state = opt.apply(params, {"x": d}, state)
        out.append((params["x"], state))
    return out


# --- hand-computed updates --------------------------------------------------------------------

def test_sgd_by_hand():
    # x += lr * delta, lr = 0.5; dyadic numbers, so float32 is exact.
    (x1, s1), (x2, _) = _rounds(sgd(0.5), t(1.0, -2.0), [t(0.25, 0.5), t(-1.0, 2.0)])
    assert torch.equal(x1, t(1.125, -1.75))
    assert torch.equal(x2, t(0.625, -0.75))
    assert s1 == {}
    # sgd(1) is plain FedAvg: params + the averaged update.
    (x1, _), = _rounds(sgd(), t(1.0, -2.0), [t(0.1, 0.2)])
    assert torch.equal(x1, t(1.0, -2.0) + t(0.1, 0.2))


def test_momentum_by_hand():
    # FedAvgM, lr = 0.5, beta = 0.5: v = beta * v + delta; x += lr * v.
    # round 1: v = [1, 2]                          x = [1, -2] + 0.5 * v = [1.5, -1]
    # round 2: v = 0.5*[1, 2] + [2, -2] = [2.5, -1]  x = [1.5, -1] + [1.25, -0.5] = [2.75, -1.5]
    # round 3: v = 0.5*[2.5, -1] + [0, 4] = [1.25, 3.5]  x = [2.75, -1.5] + [0.625, 1.75]
    steps = _rounds(momentum(0.5, beta=0.5), t(1.0, -2.0),
                    [t(1.0, 2.0), t(2.0, -2.0), t(0.0, 4.0)])
    expected = [((1.5, -1.0), (1.0, 2.0)),
                ((2.75, -1.5), (2.5, -1.0)),
                ((3.375, 0.25), (1.25, 3.5))]
    for (x, state), (ex, ev) in zip(steps, expected, strict=True):
        assert torch.equal(x, t(*ex))
        assert torch.equal(state["velocity"]["x"], t(*ev))
    # beta = 0.9 with a constant delta [1, -1]: v = 1, 1.9, 2.71; x = x0 + 1 + 1.9 + 2.71.
    steps = _rounds(momentum(1.0, beta=0.9), t(0.0, 0.0, dtype=F64), [t(1.0, -1.0, dtype=F64)] * 3)
    assert torch.allclose(steps[-1][0], t(5.61, -5.61, dtype=F64), rtol=1e-15, atol=0)


def test_adagrad_by_hand():
    # lr = 0.1, beta1 = 0, tau = 0.5: m = delta; v = v + delta², v0 = tau² = 0.25;
    # x += lr * m / (sqrt(v) + tau).
    # round 1: delta = [1.2, -1.2]; v = 0.25 + 1.44 = [1.69, 1.69]; sqrt(v) = 1.3
    #          x = 0.1 * [1.2, -1.2] / 1.8 = [1/15, -1/15]
    # round 2: delta = [0, 8.4];    v = [1.69, 1.69 + 70.56 = 72.25]; sqrt(v) = [1.3, 8.5]
    #          x = [1/15, -1/15 + 0.1 * 8.4 / 9] = [1/15, 2/75]
    (x1, s1), (x2, s2) = _rounds(adagrad(0.1, beta1=0.0, tau=0.5), t(0.0, 0.0, dtype=F64),
                                 [t(1.2, -1.2, dtype=F64), t(0.0, 8.4, dtype=F64)])
    close = dict(rtol=1e-14, atol=1e-16)
    assert torch.allclose(x1, t(1 / 15, -1 / 15, dtype=F64), **close)
    assert torch.allclose(s1["v"]["x"], t(1.69, 1.69, dtype=F64), **close)
    assert torch.allclose(x2, t(1 / 15, 2 / 75, dtype=F64), **close)
    assert torch.allclose(s2["v"]["x"], t(1.69, 72.25, dtype=F64), **close)
    assert torch.equal(s2["m"]["x"], t(0.0, 8.4, dtype=F64))  # beta1 = 0: m is the last delta


def test_adam_by_hand():
    # lr = 0.3, beta1 = 0.5, beta2 = 0.5, tau = 0.5, no bias correction; v0 = 0.25, m0 = 0.
    # round 1: delta = [0.5, 3.5]
    #   m = 0.5 * delta = [0.25, 1.75]
    #   v = 0.5 * 0.25 + 0.5 * [0.25, 12.25] = [0.25, 6.25];  sqrt(v) + tau = [1, 3]
    #   x = 0.3 * [0.25 / 1, 1.75 / 3] = [0.075, 0.175]
    # round 2: delta = [-0.5, -2.5]
    #   m = 0.5 * [0.25, 1.75] + 0.5 * [-0.5, -2.5] = [-0.125, -0.375]
    #   v = 0.5 * [0.25, 6.25] + 0.5 * [0.25, 6.25] = [0.25, 6.25];  sqrt(v) + tau = [1, 3]
    #   x = [0.075 - 0.3 * 0.125, 0.175 - 0.3 * 0.375 / 3] = [0.0375, 0.1375]
    (x1, s1), (x2, s2) = _rounds(adam(0.3, beta1=0.5, beta2=0.5, tau=0.5),
                                 t(0.0, 0.0, dtype=F64),
                                 [t(0.5, 3.5, dtype=F64), t(-0.5, -2.5, dtype=F64)])
    close = dict(rtol=1e-14, atol=1e-16)
    assert torch.equal(s1["m"]["x"], t(0.25, 1.75, dtype=F64))
    assert torch.equal(s1["v"]["x"], t(0.25, 6.25, dtype=F64))
    assert torch.allclose(x1, t(0.075, 0.175, dtype=F64), **close)
    assert torch.equal(s2["m"]["x"], t(-0.125, -0.375, dtype=F64))
    assert torch.equal(s2["v"]["x"], t(0.25, 6.25, dtype=F64))
    assert torch.allclose(x2, t(0.0375, 0.1375, dtype=F64), **close)


def test_yogi_by_hand():
    # lr = 0.3, beta1 = 0.5, beta2 = 0.5, tau = 0.5; v = v - (1 - b2) * d² * sign(v - d²).
    # round 1: delta = [0.5, 2]; d² = [0.25, 4]; sign(v0 - d²) = sign([0, -3.75]) = [0, -1]
    #   v = [0.25 - 0, 0.25 + 0.5 * 4] = [0.25, 2.25];  m = [0.25, 1]
    #   x = 0.3 * [0.25 / (0.5 + 0.5), 1 / (1.5 + 0.5)] = [0.075, 0.15]
    # round 2: delta = [-1, 1]; d² = [1, 1]; sign(v - d²) = sign([-0.75, 1.25]) = [-1, +1]
    #   v = [0.25 + 0.5, 2.25 - 0.5] = [0.75, 1.75]  (Adam would give 0.5*v + 0.5*d²)
    #   m = 0.5 * [0.25, 1] + 0.5 * [-1, 1] = [-0.375, 1]
    #   x = [0.075 - 0.3 * 0.375 / (sqrt(0.75) + 0.5), 0.15 + 0.3 / (sqrt(1.75) + 0.5)]
    #     ~ [-0.0073557, 0.3145751]
    (x1, s1), (x2, s2) = _rounds(yogi(0.3, beta1=0.5, beta2=0.5, tau=0.5),
                                 t(0.0, 0.0, dtype=F64),
                                 [t(0.5, 2.0, dtype=F64), t(-1.0, 1.0, dtype=F64)])
    close = dict(rtol=1e-14, atol=1e-16)
    assert torch.equal(s1["v"]["x"], t(0.25, 2.25, dtype=F64))
    assert torch.equal(s1["m"]["x"], t(0.25, 1.0, dtype=F64))
    assert torch.allclose(x1, t(0.075, 0.15, dtype=F64), **close)
    assert torch.equal(s2["v"]["x"], t(0.75, 1.75, dtype=F64))
    assert torch.equal(s2["m"]["x"], t(-0.375, 1.0, dtype=F64))
    expected = t(0.075 - 0.3 * 0.375 / (math.sqrt(0.75) + 0.5),
                 0.15 + 0.3 / (math.sqrt(1.75) + 0.5), dtype=F64)
    assert torch.allclose(x2, expected, **close)
    assert torch.allclose(x2, t(-0.0073557, 0.3145751, dtype=F64), rtol=0, atol=1e-7)


@pytest.mark.parametrize("opt", [sgd(0.5), momentum(0.5, 0.5), adagrad(0.1, 0.5, 0.5),
                                 adam(0.1, 0.5, 0.5, 0.5), yogi(0.1, 0.5, 0.5, 0.5)],
                         ids=repr)
def test_apply_is_pure(opt):
    params = {"a": t(1.0, 2.0), "b": t(-3.0)}
    state = opt.init(params)
    p0 = {k: v.clone() for k, v in params.items()}
    s0 = {k: {n: v.clone() for n, v in d.items()} for k, d in state.items()}
    opt.apply(params, {"a": t(0.5, 0.5), "b": t(1.0)}, state)
    assert all(torch.equal(params[k], p0[k]) for k in p0)
    assert all(torch.equal(state[k][n], s0[k][n]) for k in s0 for n in s0[k])


def test_adaptive_initial_state():
    state = adam(tau=0.25).init({"a": torch.ones(2, 2), "b": torch.ones(3, dtype=F64)})
    assert torch.equal(state["m"]["a"], torch.zeros(2, 2))
    assert torch.equal(state["v"]["a"], torch.full((2, 2), 0.0625))  # tau²
    assert state["v"]["b"].dtype == F64


# --- the same as torch.optim fed grad = -update -----------------------------------------------

def _torch_rounds(opt: torch.optim.Optimizer, p: torch.nn.Parameter, deltas):
    for d in deltas:
        opt.zero_grad()
        p.grad = -d
        opt.step()
    return p.detach()


def _deltas(seed: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(7, generator=g, dtype=dtype)
    return x0, [torch.randn(7, generator=g, dtype=dtype) * 3 for _ in range(n)]


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), rounds=st.integers(1, 6),
       beta=st.sampled_from([0.0, 0.5, 0.9, 0.99]))
def test_momentum_lr1_is_bit_identical_to_torch_sgd(seed, rounds, beta):
    # With lr = 1 both do exactly the same float32 operations: torch's buf = beta*buf + grad,
    # p -= buf, is ours with every sign flipped (negation is exact), so the results are equal
    # bit for bit.
    x0, deltas = _deltas(seed, rounds, torch.float32)
    p = torch.nn.Parameter(x0.clone())
    ref = _torch_rounds(torch.optim.SGD([p], lr=1.0, momentum=beta), p, deltas)
    assert torch.equal(_rounds(momentum(1.0, beta), x0, deltas)[-1][0], ref)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), rounds=st.integers(1, 6),
       lr=st.sampled_from([0.01, 0.3, 0.7, 2.0]), beta=st.sampled_from([0.0, 0.5, 0.9]))
def test_momentum_equals_torch_sgd(seed, rounds, lr, beta):
    # With lr != 1 torch computes p.add_(buf, alpha=-lr) as one fused multiply-add (a single
    # rounding) where we round lr * v first, so the two differ in the last bit: we compare in
    # float64 at 1e-12 (an ulp of float32 would be ~1e-7).
    x0, deltas = _deltas(seed, rounds, F64)
    p = torch.nn.Parameter(x0.clone())
    ref = _torch_rounds(torch.optim.SGD([p], lr=lr, momentum=beta), p, deltas)
    got = _rounds(momentum(lr, beta), x0, deltas)[-1][0]
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), rounds=st.integers(1, 6),
       lr=st.sampled_from([0.01, 0.1, 1.0]), tau=st.sampled_from([1e-3, 0.1, 0.5]),
       dtype=st.sampled_from([torch.float32, F64]))
def test_adagrad_beta1_0_equals_torch_adagrad(seed, rounds, lr, tau, dtype):
    # torch.optim.Adagrad (lr_decay = weight_decay = 0): sum += g²; p -= lr * g / (sqrt(sum) + eps).
    # With sum0 = initial_accumulator_value = tau², eps = tau and g = -delta this is FedAdagrad
    # with beta1 = 0 term for term: the same formula. Only the rounding order differs (torch
    # fuses g*g into the accumulation with addcmul and computes g / std before scaling by lr;
    # we compute lr * m before dividing), so the results agree to a few ulps, not bit for bit.
    x0, deltas = _deltas(seed, rounds, dtype)
    p = torch.nn.Parameter(x0.clone())
    ref = _torch_rounds(
        torch.optim.Adagrad([p], lr=lr, initial_accumulator_value=tau**2, eps=tau), p, deltas)
    got = _rounds(adagrad(lr, beta1=0.0, tau=tau), x0, deltas)[-1][0]
    tol = 1e-12 if dtype == F64 else 1e-5
    assert torch.allclose(got, ref, rtol=tol, atol=tol)


# --- configuration errors ---------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: sgd(0), "sgd: lr must be > 0 (got 0)."),
    (lambda: sgd(-1.0), "sgd: lr must be > 0 (got -1.0)."),
    (lambda: momentum(0.0), "momentum: lr must be > 0 (got 0.0)."),
    (lambda: momentum(1.0, beta=1.0), "momentum: beta must be in [0, 1) (got 1.0)."),
    (lambda: momentum(1.0, beta=-0.1), "momentum: beta must be in [0, 1) (got -0.1)."),
    (lambda: adagrad(tau=0), "adagrad: tau must be > 0 (got 0)."),
    (lambda: adagrad(beta1=1), "adagrad: beta1 must be in [0, 1) (got 1)."),
    (lambda: adam(lr=-0.01), "adam: lr must be > 0 (got -0.01)."),
    (lambda: adam(beta2=1.0), "adam: beta2 must be in [0, 1) (got 1.0)."),
    (lambda: yogi(lr=float("nan")), "yogi: lr must be > 0 (got nan)."),
    (lambda: yogi(beta1=1.5), "yogi: beta1 must be in [0, 1) (got 1.5)."),
    (lambda: yogi(tau=-1e-3), "yogi: tau must be > 0 (got -0.001)."),
    (lambda: Adaptive("rmsprop", 0.1, 0.9, 0.99, 1e-3),
     "adaptive server optimizer: unknown rule 'rmsprop'."),
])
def test_bad_hyper_parameters(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value) == message


def test_reprs():
    assert repr(sgd()) == "sgd(1)"
    assert repr(momentum(0.5, beta=0.9)) == "momentum(0.5, beta=0.9)"
    assert repr(adagrad()) == "adagrad(0.1, beta1=0, tau=0.001)"
    assert repr(adam()) == "adam(0.01, beta1=0.9, beta2=0.99, tau=0.001)"
    assert repr(yogi(0.02)) == "yogi(0.02, beta1=0.9, beta2=0.99, tau=0.001)"
