"""Data-parallel training on torch.distributed: N workers equal one worker on the combined
batch; local SGD with H = 1 equals synchronous DDP (plain SGD)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shoal import data_parallel
from shoal.config import load_config
from shoal.data import tasks
from shoal.data.tasks import load_task
from shoal.data_parallel import DataParallel
from shoal.errors import WorkerError
from shoal.experiment import initial_params, resolve_config, run_experiment
from shoal.transport import FunctionTransport
from shoal.workers import GUARD_FIX

BASE = ["seed=4", "task.name=digits", "task.hidden=16", "data.partition=iid",
        "data.num_clients=4", "federated.rounds=2", "client.lr=0.05", "baseline=false",
        "evaluation.central_every=0", "data_parallel.steps_per_round=6"]


def _train(overrides: list[str]) -> dict[str, torch.Tensor]:
    config = load_config(None, BASE + overrides)
    task = load_task("digits", hidden=16)
    config = resolve_config(config, task)
    _, params0 = initial_params(config, task)
    algorithm = DataParallel(config)
    state = algorithm.init(params0)
    try:
        for r in (1, 2):
            state, report = algorithm.round(state, FunctionTransport([], lambda m: m), r)
            assert report.failed is None
    finally:
        algorithm.close()
    return state.params


def test_two_workers_equal_one_worker_on_the_combined_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    one = _train(["paradigm=data_parallel", "data_parallel.workers=1", "client.batch_size=16"])
    # Two workers through `shoal run`'s path: the registered paradigm, spawned worker process.
    config = load_config(None, BASE + ["paradigm=data_parallel", "data_parallel.workers=2",
                                       "client.batch_size=8"])
    (result,) = run_experiment(config, tmp_path / "run")
    assert result.rounds == 2 and result.examples == 2 * 6 * 16
    two = load_file(str(tmp_path / "run" / "data_parallel" / "model.safetensors"))
    assert one.keys() == two.keys()
    moved = max(float((one[k] - initial).abs().max()) for k, initial in
                initial_params(resolve_config(config, load_task("digits", hidden=16)),
                               load_task("digits", hidden=16))[1].items())
    assert moved > 1e-3  # training did change the model
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    # Costs: per round, the params broadcast (S) and 6 steps of gradient all-reduce (6 S) plus
    # the loss (8 bytes), each rank's share of the ring's wire bytes on its link.
    size = sum(v.numel() * v.element_size() for v in one.values())
    for h in result.history:
        assert h["data_parallel/collective_bytes"] == 7 * size + 8
        assert h["comm/bytes_peer"] == 2 * (6 * size + 8) + size  # 2 (W - 1) S + (W - 1) S
        assert "dp/epsilon" not in h and "data_parallel/workers" in h
    assert result.cost["clients"]["count"] == 2  # rank-0 and rank-1
    assert result.cost["bytes"]["peer"] == 2 * (2 * (6 * size + 8) + size)


def test_local_sgd_every_step_equals_synchronous_ddp() -> None:
    torch.set_num_threads(1)
    one = _train(["data_parallel.workers=1", "client.batch_size=16"])
    local = _train(["data_parallel.workers=2", "data_parallel.local_steps=1",
                    "client.batch_size=8"])
    for k in one:
        torch.testing.assert_close(local[k], one[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_worker(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    one = _train(["data_parallel.workers=1", "client.batch_size=16"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "shoal",
         "data-parallel", "/dev/null", "--out", str(tmp_path / "run"),
         *(a for s in BASE + ["client.batch_size=8"] for a in ("--set", s))],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = load_file(str(tmp_path / "run" / "data_parallel" / "model.safetensors"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


def _dies_after_reporting(rank, ready, *args) -> None:
    """A worker that reports its start, then dies before it joins the process group."""
    from shoal.workers import report_started

    report_started(ready, rank)
    ready.close()
    ready.join_thread()  # the report is delivered before the worker dies
    os._exit(3)


def _raised_within(fn, seconds: float = 60.0) -> BaseException | None:
    """What ``fn()`` raised, run in a thread that must end within ``seconds`` (the parent must
    not wait for a dead worker)."""
    box: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            box.append(None)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            box.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the parent still waits for its workers after {seconds:g} s"
    return box[0]


def test_a_worker_that_dies_joining_the_group_stops_the_run_naming_it(monkeypatch) -> None:
    monkeypatch.setattr(data_parallel, "_spawned", _dies_after_reporting)
    error = _raised_within(lambda: _train(["data_parallel.workers=2", "client.batch_size=8"]))
    assert isinstance(error, WorkerError), repr(error)
    text = str(error)
    assert text.startswith("data_parallel: worker process 1 exited with code 3 while the ranks "
                           "were joining the process group (torch.distributed rendezvous at "
                           "tcp://127.0.0.1:"), text
    assert text.endswith("backend 'gloo'); its error, if any, is printed above. The run stops "
                         f"here and the other workers were stopped. {GUARD_FIX}"), text


def test_a_worker_that_cannot_build_its_task_stops_the_run_with_its_error(monkeypatch) -> None:
    """A task registered only in the parent (as under a script's __main__ guard)."""
    tasks.task_names()  # the built-in tasks are registered before the registry is copied
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    tasks.register_task("parent_only_digits")(_parent_only_digits)
    config = load_config(None, BASE + ["task.name=parent_only_digits", "data_parallel.workers=2",
                                       "client.batch_size=8"])
    algorithm = DataParallel(config)
    _, params0 = initial_params(resolve_config(config, load_task("digits", hidden=16)),
                                load_task("digits", hidden=16))
    state = algorithm.init(params0)

    def round_one() -> None:
        try:
            algorithm.round(state, FunctionTransport([], lambda m: m), 1)
        finally:
            algorithm.close()

    error = _raised_within(round_one)
    assert isinstance(error, WorkerError), repr(error)
    text = str(error)
    assert text.startswith("data_parallel: worker process 1 could not start:\nTraceback"), text
    assert "ConfigError: load_task: unknown task 'parent_only_digits'" in text
    assert text.endswith("\nA task or model registered in the script that starts shoal, under "
                         "its `if __name__ == \"__main__\":` guard, is unknown to the worker "
                         "processes (they import the script without running that block): "
                         "register it at the script's top level or in a module it imports.")


def _parent_only_digits(*, hidden: int = 16):
    return load_task("digits", hidden=hidden)


def test_one_rank_refuses_a_used_out_unless_overwrite(tmp_path: Path) -> None:
    """`shoal data-parallel` (one torchrun rank, here a world of one) never writes into a run
    that exists: a second start is refused naming --overwrite, which then starts afresh."""
    from tests.net._helpers import free_port

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
    out = tmp_path / "run"

    def start(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shoal", "data-parallel", "/dev/null", "--out", str(out),
             *(a for s in [*BASE, "federated.rounds=1", "data_parallel.workers=1"]
               for a in ("--set", s)), *extra],
            env=env, capture_output=True, text=True, timeout=300)

    first = start()
    assert first.returncode == 0, first.stdout + first.stderr
    (out / "notes.txt").write_text("the user's own file")
    again = start()
    assert again.returncode != 0
    assert f"run directory {out} already holds files" in again.stderr
    assert (out / "notes.txt").exists()
    fresh = start("--overwrite")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert (out / "data_parallel" / "model.safetensors").exists()
