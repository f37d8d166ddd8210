"""Executors: same seed, same global params (bit for bit where the arithmetic order is the same,
within float rounding otherwise); clear errors for clients that fail and models that cannot be
vectorized."""

from __future__ import annotations

import functools
import logging
import re

import pytest
import torch
from torch import nn

from shoal import tree
from shoal.aggregate import Pipeline, clip_by_norm, coordinate_median, weighted_mean
from shoal.algorithms.collect import RoundFold
from shoal.algorithms.fedavg import FedAvg
from shoal.client import local_sgd
from shoal.config import load_config
from shoal.data.arrays import ArrayData
from shoal.data.federated import ClientData
from shoal.errors import ClientError, ConfigError
from shoal.message import Message
from shoal.run import run
from shoal.sim import InProcessTransport, simulated_dropout
from shoal.sim.executor import AutoExecutor, SequentialExecutor, VectorizedExecutor, make_executor
from shoal.sim.processes import ProcessesExecutor, backend, balance, use_gpu

from .conftest import cross_entropy, make_tiny, sgd

# Vectorized and processes add the same numbers in another order (batched matrix products, a
# masked mean, per-rank partial sums), so they agree with sequential to float32 rounding only.
TOL = {"rtol": 1e-5, "atol": 1e-6}


def unequal_federation(seed: int = 0) -> tuple[dict[str, ClientData], list[str]]:
    """Six clients of 3 to 23 examples (unequal sizes exercise padding and masking)."""
    t = make_tiny(clients=6, per_client=25, seed=seed)
    sizes = [23, 3, 17, 9, 12, 5]
    data = {cid: ClientData(ArrayData(t.x, t.y, torch.arange(i * 25, i * 25 + n)), None)
            for i, (cid, n) in enumerate(zip(t.ids, sizes, strict=True))}
    return data, t.ids


def tiny_model(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if batchnorm:
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def train(executor, *, rounds: int = 3, pipeline: Pipeline | None = None, mods=(),
          model: nn.Module | None = None, on_error: str = "drop", data=None, **sgd_kwargs):
    data_map, ids = data if data is not None else unequal_federation()
    model = model if model is not None else tiny_model()
    opt = sgd_kwargs.pop("optimizer", sgd(0.1))
    update = local_sgd(model, cross_entropy, batch_size=4, optimizer=opt, **sgd_kwargs)
    fedavg = FedAvg(update, pipeline=pipeline, seed=5)
    with InProcessTransport(ids, data_map.__getitem__, fedavg.handlers(), mods=mods,
                            on_error=on_error, executor=executor) as transport:  # type: ignore[arg-type]
        res = run(fedavg, transport, rounds=rounds, params=tree.params_of(model))
    return res.state.params, res.history


def assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL)


def test_sequential_executor_is_bit_identical_to_the_plain_transport():
    mods = [simulated_dropout(0.3, seed=1)]
    plain, h1 = train(None, mods=mods)
    seq, h2 = train(SequentialExecutor(), mods=mods)
    assert tree.equal(plain, seq)
    assert [h["round/dropped"] for h in h1] == [h["round/dropped"] for h in h2]


@pytest.mark.parametrize("kwargs", [
    {"epochs": 2},
    {"optimizer": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3)},
    {"prox_mu": 0.5, "max_steps": 3},
], ids=["plain", "momentum-wd", "prox-maxsteps"])
def test_vectorized_matches_sequential(kwargs):
    seq, hs = train("sequential", **dict(kwargs))
    vec, hv = train("vectorized", **dict(kwargs))
    assert_close(seq, vec)
    for a, b in zip(hs, hv, strict=True):
        assert a["train/examples"] == b["train/examples"]
        assert a["train/steps"] == b["train/steps"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)


@pytest.mark.parametrize(("sizes", "epochs", "max_steps"), [
    ([23, 3, 17, 0, 9], 1, None), ([23, 3, 17, 9], 2, None), ([23, 3, 17, 9], 3, 7)],
    ids=["one-epoch-with-empty", "two-epochs", "max-steps-cuts-an-epoch"])
def test_the_batched_schedules_are_the_batches_local_sgd_draws(sizes, epochs, max_steps):
    from shoal.batched.local_sgd import VectorizedLocalSGD
    from shoal.seeding import torch_generator
    from shoal.types import ClientInfo
    x, y = torch.randn(100, 8), torch.randint(0, 3, (100,))
    datas = [ArrayData(x, y, torch.randperm(100)[:n]) for n in sizes]
    infos = [ClientInfo(f"c{i}", 2, 40 + i) for i in range(len(sizes))]
    update = local_sgd(tiny_model(), cross_entropy, batch_size=4, epochs=epochs,
                       max_steps=max_steps)
    trainer = VectorizedLocalSGD(update)
    s_max = max(trainer.steps(n) for n in sizes)
    rows = torch.full((len(sizes), s_max, 4), -1, dtype=torch.int64)
    trainer.schedules(datas, infos, rows)
    for j, (data, info) in enumerate(zip(datas, infos, strict=True)):
        g = torch_generator(info.seed, "batches")  # what local_sgd draws, batch by batch
        want = [b for _ in range(epochs) for b in data.batch_rows(4, g)][:max_steps]
        assert len(want) == trainer.steps(len(data))
        for s in range(s_max):
            got = rows[j, s]
            if s < len(want):
                assert got[:len(want[s])].tolist() == want[s].tolist()
                assert (got[len(want[s]):] == -1).all()
            else:
                assert (got == -1).all()
        assert torch.equal(trainer.schedule(data, info), rows[j, :len(want)])


@pytest.mark.parametrize("kwargs", [
    {}, {"optimizer": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9,
                                        weight_decay=1e-3), "prox_mu": 0.1}],
    ids=["plain", "momentum-wd-prox"])
def test_vectorized_with_fused_linear_layers_matches_sequential(kwargs):
    torch.manual_seed(3)
    wide = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 3))  # 4,096 weights
    seq, hs = train("sequential", model=wide, **dict(kwargs))
    executor = VectorizedExecutor()
    vec, hv = train(executor, model=wide, **dict(kwargs))
    # Steps are replayed, so every linear layer is fused (fuse_min_weights="auto").
    trainer = executor._handlers["train"][1].trainer
    assert trainer.fused == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert trainer._traced.graphs
    assert_close(seq, vec)
    assert [h["train/loss"] for h in hs] == pytest.approx([h["train/loss"] for h in hv],
                                                         rel=1e-5)


def test_vectorized_with_stages_dropout_and_small_batches_matches_sequential():
    pipe = Pipeline([clip_by_norm(0.05)], weighted_mean())
    mods = [simulated_dropout(0.3, seed=2)]
    seq, hs = train("sequential", pipeline=pipe, mods=mods)
    vec, hv = train(VectorizedExecutor(max_clients=2), pipeline=pipe, mods=mods)
    assert_close(seq, vec)
    assert [h["round/dropped"] for h in hs] == [h["round/dropped"] for h in hv]


def _falls_back(caplog, model=None, **kwargs):
    """Train with the vectorized executor and with the sequential one: the vectorized one
    must fall back for 'train', say why once, and give the sequential result bit for bit."""
    executor = VectorizedExecutor()
    with caplog.at_level(logging.WARNING, logger="shoal.sim.executor"):
        got, _ = train(executor, model=model, rounds=2, **dict(kwargs))
    seq, _ = train("sequential", model=model, rounds=2, **dict(kwargs))
    assert tree.equal(seq, got)
    said = [r.getMessage() for r in caplog.records if r.name == "shoal.sim.executor"]
    assert len(said) == 1  # once, not every round
    assert said[0].startswith("vectorized executor: 'train' messages run one by one "
                              "(sequentially): ")
    return executor.fallbacks["train"]


def test_vectorized_falls_back_for_batchnorm_and_says_why(caplog):
    why = _falls_back(caplog, model=tiny_model(batchnorm=True))
    assert why == (
        "vectorized executor: layer '1' (BatchNorm1d) updates running statistics while "
        "training, which cannot be kept per client under torch.func.vmap; use "
        "executor='sequential' or 'processes' (or 'auto', which falls back), or build the "
        "layer with track_running_stats=False (or use GroupNorm/LayerNorm).")


def test_vectorized_falls_back_for_other_optimizers_and_says_why(caplog):
    why = _falls_back(caplog, optimizer=functools.partial(torch.optim.Adam, lr=0.01))
    assert why == (
        "vectorized executor: the client optimizer is functools.partial(<class "
        "'torch.optim.adam.Adam'>, lr=0.01); it implements torch.optim.SGD (lr, momentum, "
        "weight_decay) only; use executor='sequential' or 'processes' (or 'auto', which falls "
        "back).")


def test_vectorized_falls_back_for_a_client_update_without_a_batched_form(caplog):
    from shoal.privacy import dp_sgd

    data, ids = unequal_federation()
    model = tiny_model()
    update = dp_sgd(model, cross_entropy, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=4,
                    reproducible=True)
    runs = []
    for executor in (VectorizedExecutor(), SequentialExecutor()):
        fedavg = FedAvg(update, seed=5)
        with InProcessTransport(ids, data.__getitem__, fedavg.handlers(),
                                executor=executor) as transport:
            runs.append(run(fedavg, transport, rounds=1, params=tree.params_of(model)))
    assert tree.equal(runs[0].state.params, runs[1].state.params)
    assert runs[0].history[0]["round/replied"] == 6


def test_auto_falls_back_to_sequential_for_batchnorm_and_vectorizes_otherwise():
    auto = AutoExecutor(workers=1)
    seq, _ = train("sequential", model=tiny_model(batchnorm=True), rounds=2)
    got, _ = train(auto, model=tiny_model(batchnorm=True), rounds=2)
    assert isinstance(auto.chosen, SequentialExecutor)
    assert tree.equal(seq, got)
    auto = AutoExecutor(workers=1)
    train(auto, rounds=1)
    assert isinstance(auto.chosen, VectorizedExecutor)


class ItemNet(nn.Module):
    """Passes the static checks, but calls .item() in forward, which vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out if out.abs().max().item() < 1e9 else out * 0


def test_a_model_vmap_cannot_run_falls_back_and_so_does_auto(caplog):
    why = _falls_back(caplog, model=ItemNet())
    assert re.match(r"^vectorized executor: the model cannot run under torch\.func\.vmap: "
                    r"RuntimeError: .*; use executor='sequential' or 'processes' \(or 'auto', "
                    r"which falls back\)\.$", why)
    auto = AutoExecutor(workers=1)
    seq, _ = train("sequential", model=ItemNet(), rounds=2)
    got, _ = train(auto, model=ItemNet(), rounds=2)
    assert isinstance(auto.chosen, SequentialExecutor)
    assert tree.equal(seq, got)


def broken_federation():
    """Client-3's examples have 5 features instead of 8: its first forward pass fails."""
    data, ids = unequal_federation()
    bad = make_tiny(clients=1, per_client=10)
    x5 = bad.x[:, :5].contiguous()
    data["client-3"] = ClientData(ArrayData(x5, bad.y, torch.arange(9)), None)
    return data, ids


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_a_client_error_names_the_client_round_and_step(executor):
    with pytest.raises(ClientError) as e:
        train(executor, data=broken_federation(), on_error="raise", rounds=2)
    err = e.value
    assert (err.client, err.round, err.step) == ("client-3", 1, 0)
    assert str(err).startswith("client 'client-3' failed in round 1 at local step 0: "
                               "RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert isinstance(err.__cause__, RuntimeError)  # the original, with its traceback


def test_a_failing_client_is_dropped_by_default_with_every_in_process_executor():
    for executor in ("sequential", "vectorized"):
        _, hist = train(executor, data=broken_federation(), rounds=1)
        assert hist[0]["round/dropped"] == 1.0


def test_balance_deals_largest_first_to_the_least_loaded_rank():
    assert balance([5, 50, 20, 20, 10], 2) == [0, 0, 1, 1, 1]  # loads 55 and 50
    assert balance([], 3) == []
    assert sorted(balance([1] * 6, 3)) == [0, 0, 1, 1, 2, 2]


def test_fold_in_parts_equals_the_pipeline_reduction():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    reqs = [Message("train", "coordinator", f"c{i}", 1, params) for i in range(5)]
    reps = [r.reply(tensors={k: torch.randn(v.shape, generator=g) for k, v in params.items()},
                    config={"weight": float(i + 1)}) for i, r in enumerate(reqs)]
    pipe = Pipeline([clip_by_norm(1.0, runs_at="coordinator")], weighted_mean())
    fold = RoundFold(pipe, params, pipe.client_configs(pipe.init()), 1, 0)
    whole, n = fold.finish(fold.fold(reqs, reps))
    expected, m = pipe.reduce(((r.src, r.tensors, r.config["weight"]) for r in reps),
                              pipe.client_configs(pipe.init()), 1, 0)
    assert n == m == 5 and tree.equal(whole, expected)  # one part: the same arithmetic
    parts = [fold.fold([reqs[i] for i in ix], [reps[i] for i in ix], ix) for ix in ([3, 0], [4, 1, 2])]
    merged = fold.merge(parts)
    assert merged.positions == [0, 1, 2, 3, 4]
    split, _ = fold.finish(merged)
    assert_close(whole, split)


def _stacked_replies(nan_row: int | None = None, overflow: bool = False):
    """Five replies whose tensors are rows of two stacks (rows in another order than the
    cohort, as the vectorized trainer sorts clients), one of them an error and one with a
    weight of 0."""
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    # The weight stack in a transposed memory layout, as the trainer keeps linear weights.
    stacks = {"w": torch.randn(5, 2, 3, generator=g).transpose(1, 2),
              "b": torch.randn(5, 2, generator=g)}
    if nan_row is not None:
        stacks["w"][nan_row, 1, 0] = float("nan")
    if overflow:  # every row finite, their weighted sum is not
        stacks["b"].fill_(3e38)
    order = [2, 0, 4, 1, 3]  # client i is row order[i]
    reqs = [Message("train", "coordinator", f"c{i}", 1, params) for i in range(5)]
    reps = [r.reply(tensors={k: t[order[i]] for k, t in stacks.items()},
                    config={"weight": float(i + 1)}) for i, r in enumerate(reqs)]
    reps[3] = reqs[3].failed("simulated dropout")
    reps[1].config["weight"] = 0
    rows = {id(rep.tensors): (stacks, order[i]) for i, rep in enumerate(reps)}
    return params, reqs, reps, lambda rep: rows.get(id(rep.tensors))


@pytest.mark.parametrize(("nan_row", "overflow"), [(None, False), (4, False), (None, True)],
                         ids=["finite", "nan-row", "overflowing-sum"])
def test_folding_rows_of_stacks_equals_folding_reply_by_reply(nan_row, overflow):
    params, reqs, reps, rows = _stacked_replies(nan_row, overflow)
    pipe = Pipeline([], weighted_mean())
    fold = RoundFold(pipe, params, [], 1, 0)
    one_by_one = fold.fold(reqs, reps)
    stacked = fold.fold(reqs, reps, rows=rows)
    assert stacked.positions == one_by_one.positions
    assert sorted(stacked.fold.weights) == sorted(one_by_one.fold.weights)
    assert stacked.metrics == one_by_one.metrics
    assert stacked.dropped == one_by_one.dropped  # same reasons, word for word
    assert_close(fold.finish(stacked)[0], fold.finish(one_by_one)[0])
    dropped = {d[1]: d[2] for d in stacked.dropped}
    assert dropped["c1"] == "weight must be a finite number > 0, got 0"
    if nan_row is not None:
        assert sorted(dropped) == ["c1", "c2", "c3"]
        assert dropped["c2"].startswith("update: 'w' holds 1 non-finite value(s)")
    else:
        assert sorted(dropped) == ["c1", "c3"]


def test_the_vectorized_executor_folds_its_batch_as_rows_unless_a_mod_replaced_them():
    def poison(m, ctx, handler):  # replaces client-2's update; in place for client-4
        reply = handler(m, ctx)
        if m.kind == "train" and m.dst == "client-2":
            return reply.with_tensors({k: torch.full_like(v, 0.01) for k, v in reply.tensors.items()})
        if m.kind == "train" and m.dst == "client-4":
            reply.tensors["0.weight"].fill_(float("inf"))
        return reply

    seen: list[tuple[str, bool]] = []
    executor = VectorizedExecutor()
    rows_of = executor.rows_of
    executor.rows_of = lambda rep: seen.append((rep.src, rows_of(rep) is not None)) or rows_of(rep)  # type: ignore[method-assign]
    vec, hv = train(executor, mods=[poison], rounds=1)
    seq, hs = train("sequential", mods=[poison], rounds=1)
    assert dict(seen) == {f"client-{i}": i != 2 for i in range(6)}
    assert hv[0]["round/dropped"] == hs[0]["round/dropped"] == 1.0  # client-4: not finite
    assert_close(seq, vec)


def test_config_selects_the_executor():
    from shoal.data.tasks import load_task
    from shoal.experiment import build_federated, make_dataset, resolve_config
    config = load_config(None, ["federated.executor=vectorized", "task.name=digits"])
    task = load_task("digits")
    config = resolve_config(config, task)
    _, transport = build_federated(config, task, make_dataset(config, task), task.model_fn())
    assert isinstance(transport.executor, VectorizedExecutor)
    with pytest.raises(ConfigError, match="expected one of 'sequential', 'vectorized', "
                       "'processes', 'auto', got 'gpu'"):
        load_config(None, ["federated.executor=gpu"])
    with pytest.raises(ConfigError, match=r"^executor: unknown executor 'fast'; expected one of "
                       r"'sequential', 'vectorized', 'processes', 'auto'\.$"):
        make_executor("fast")


# -- processes: 2 ranks (this process and one worker), a few rounds ------------------------------

@pytest.mark.parametrize("reducer, inner", [(weighted_mean(), "vectorized"),
                                            (coordinate_median(), "sequential")],
                         ids=["mean-streamed", "median-gathered"])
def test_processes_matches_sequential(reducer, inner):
    pipe = Pipeline([], reducer)
    mods = [simulated_dropout(0.2, seed=3)]
    seq, hs = train("sequential", pipeline=pipe, mods=mods, rounds=2)
    got, hp = train(ProcessesExecutor(2, inner=inner), pipeline=pipe, mods=mods, rounds=2)
    assert_close(seq, got)
    for a, b in zip(hs, hp, strict=True):
        assert a["round/replied"] == b["round/replied"]
        assert a["comm/bytes_down"] == b["comm/bytes_down"]


def test_processes_client_error_names_the_client_and_round():
    with pytest.raises(ClientError) as e:
        train(ProcessesExecutor(2), data=broken_federation(), on_error="raise", rounds=1)
    assert (e.value.client, e.value.round, e.value.step) == ("client-3", 1, 0)
    assert str(e.value).startswith("ClientError: client 'client-3' failed in round 1 at local "
                                   "step 0: RuntimeError: mat1 and mat2 shapes")
    assert "raised in a worker process; its traceback:" in str(e.value)


def test_processes_refuses_unpicklable_federations_clearly():
    data, ids = unequal_federation()
    with pytest.raises(ConfigError, match=r"^processes executor: cannot send the federation to "
                       r"worker processes: .*; or use executor='sequential' or 'vectorized'\.$"):
        train(ProcessesExecutor(2), data=({k: v for k, v in data.items()}, ids),
              mods=[lambda m, c, h: h(m, c)], rounds=1)


@pytest.mark.slow
def test_torchrun_example_matches_the_sequential_executor(tmp_path):
    """Two ranks under torchrun (rank 0 runs the loop, rank 1 serves) reach the accuracy the
    sequential executor reaches from the same config."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from shoal.experiment import run_experiment

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2",
                          str(root / "examples" / "torchrun_processes.py"), "federated.rounds=3"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    got = float(re.search(r"central accuracy (\d\.\d+)", out).group(1))
    config = load_config(None, ["task.name=digits", "federated.rounds=3", "baseline=false"])
    (result,) = run_experiment(config, tmp_path)
    assert got == pytest.approx(result.final["accuracy"], abs=1e-4)


def test_use_gpu_places_a_ranks_local_sgd_only_when_cuda_and_sequential(monkeypatch) -> None:
    tiny = make_tiny()
    algo = FedAvg(local_sgd(tiny.model(), cross_entropy, optimizer=sgd(0.1)), seed=0)
    transport = InProcessTransport(tiny.ids, tiny.data.__getitem__, algo.handlers())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert use_gpu(transport, 1, "sequential") is None and algo.client_update.device is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert use_gpu(transport, 3, "vectorized") is None and algo.client_update.device is None
    assert use_gpu(transport, 3, "sequential") == torch.device("cuda", 1)  # ranks share GPUs
    assert algo.client_update.device == torch.device("cuda", 1)


def test_backend_is_nccl_for_gpus_of_their_own_and_gloo_otherwise(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend(2, "sequential") == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    assert backend(2, "sequential") == "cpu:gloo,cuda:nccl"  # sums on NCCL, objects on gloo
    assert backend(1, "sequential") == "cpu:gloo,cuda:nccl"
    assert backend(3, "sequential") == "gloo"  # two ranks would share a GPU: NCCL refuses
    assert backend(2, "vectorized") == "gloo"  # the ranks train on the CPU
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    assert backend(2, "sequential") == "gloo"
