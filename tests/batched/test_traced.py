"""The vectorized step replayed as a traced graph (shoal.batched.traced): bit-identical to running
it, traced once per signature after one eager sighting, off for good after a failed trace."""

from __future__ import annotations

import logging

import pytest
import torch

from shoal import tree
from shoal.batched.local_sgd import VectorizedLocalSGD
from shoal.batched.traced import TracedStep
from shoal.client import local_sgd
from shoal.data.arrays import ArrayData
from shoal.types import ClientInfo

from ..conftest import cross_entropy
from .test_fused import OPTS, models, targets


@pytest.mark.parametrize(("name", "opt"), [
    ("mlp", "plain"), ("mlp", "momentum-wd"), ("conv+linear", "prox-momentum"),
    ("frozen-weight", "prox-maxsteps"), ("sequence", "momentum-wd")])
def test_traced_trainer_is_bit_identical_to_the_eager_one(name: str, opt: str) -> None:
    model = models()[name]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(80, 8, generator=g)
    y = targets(name, torch.randint(0, 3, (80,), generator=g))
    # Equal clients (every step the same shape: traced) and unequal ones (masked last batches,
    # a shrinking cohort: some shapes seen once, which stay eager).
    cohorts = {"equal": [(0, 12), (12, 12), (24, 12)], "unequal": [(0, 13), (13, 3), (16, 9)]}
    update = local_sgd(model, cross_entropy, batch_size=4, **OPTS[opt])
    params = tree.params_of(model)
    for spans in cohorts.values():
        datas = [ArrayData(x, y, torch.arange(s, s + n)) for s, n in spans]
        traced = VectorizedLocalSGD(update, fuse_min_weights=0)
        eager = VectorizedLocalSGD(update, fuse_min_weights=0, trace=False)
        for r in range(3):  # sightings, then traces, then replays
            infos = [ClientInfo(f"c{i}", r, 100 * r + i) for i in range(len(datas))]
            a, b = traced(params, datas, infos), eager(params, datas, infos)
            for ra, rb in zip(a, b, strict=True):
                for k in params:
                    assert torch.equal(ra.update[k], rb.update[k]), (k, r)
                assert ra.metrics == rb.metrics
        assert traced._traced.graphs and traced._traced.failure is None
        assert not eager._traced.graphs


def _bump(w: torch.Tensor, x: torch.Tensor, lr: float) -> torch.Tensor:
    """An in-place step on ``w`` and a result: what a traced step does to its arguments."""
    loss = (x @ w).square().mean(1)
    w.sub_(x.t() @ (x @ w), alpha=lr)
    return loss


def test_a_signature_is_traced_on_its_second_sighting_and_replayed() -> None:
    step = TracedStep(_bump)
    w, ref = torch.ones(3, 2), torch.ones(3, 2)
    x = torch.arange(12.0).view(4, 3) / 10
    for i in range(4):
        out = step(("lr", 0.01), w, x, 0.01)
        torch.testing.assert_close(out, _bump(ref, x, 0.01), rtol=0, atol=0)
        assert torch.equal(w, ref)
        assert len(step.graphs) == (0 if i == 0 else 1)
    step(("lr", 0.01), w[:2], x[:, :2], 0.01)  # another shape: a new signature, seen once
    assert len(step.graphs) == 1
    step(("lr", 0.02), w, x, 0.02)  # another key
    step(("lr", 0.02), w, x, 0.02)
    assert len(step.graphs) == 2


def test_no_more_than_max_graphs_are_kept() -> None:
    step = TracedStep(_bump, max_graphs=1)
    w, x = torch.ones(3, 2), torch.ones(4, 3)
    for key in ("a", "a", "b", "b", "b"):
        step(key, w, x, 0.1)
    assert len(step.graphs) == 1 and step.enabled


def test_a_step_that_cannot_be_traced_runs_eagerly_for_good(
        caplog: pytest.LogCaptureFixture) -> None:
    def branchy(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):  # control flow on a tensor's value: no graph can hold it
            w.add_(1.0)
        return w.sum()

    step = TracedStep(branchy)
    w = torch.zeros(2)
    with caplog.at_level(logging.INFO, logger="shoal.batched.traced"):
        for _ in range(3):
            step("k", w, torch.ones(2))
        step("k", w, -torch.ones(2))
    assert torch.equal(w, torch.full((2,), 3.0))
    assert not step.enabled and not step.graphs
    assert step.failure is not None and "data-dependent" in step.failure.lower()
    assert "the vectorized step cannot be traced" in caplog.text


def test_replayed_graphs_drop_operations_that_only_alias_their_input() -> None:
    def aliases(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        same = x.view(x.shape).detach().permute(0, 1)  # three aliases of x: computed nothing
        w.add_(same.view(-1)[:2])  # a view to another shape stays
        return (w * 2).sum()

    step = TracedStep(aliases)
    w, ref = torch.zeros(2), torch.zeros(2)
    x = torch.arange(4.0).view(2, 2)
    for _ in range(3):
        assert torch.equal(step("k", w, x), aliases(ref, x))
        assert torch.equal(w, ref)
    (graph,) = step.graphs.values()
    ops = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.detach.default not in ops and torch.ops.aten.permute.default not in ops
    views = [n for n in graph.graph.nodes if n.target is torch.ops.aten.view.default]
    assert [tuple(n.args[1]) for n in views] == [(-1,)]
