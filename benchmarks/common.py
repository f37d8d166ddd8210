"""Shared by the benchmarks: run variants in fresh processes, take medians, print the figures.

Each measured variant runs in its own child process (``python BENCH --variant NAME``), so its
peak resident memory is its own, and variants alternate (A B A B ...) so a slow spell on this
shared machine hits all of them alike. The child prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def emit(result: dict[str, Any]) -> None:
    """Child side: print the result as the last line."""
    print(json.dumps(result), flush=True)


def run_child(script: str, variant: str, args: Sequence[str] = (),
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --variant variant *args`` in a fresh interpreter; return its JSON result."""
    proc = subprocess.run([sys.executable, script, "--variant", variant, *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{script} --variant {variant} failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(script: str, variants: Sequence[str], reps: int, args: Sequence[str] = (),
              ) -> dict[str, list[dict[str, Any]]]:
    """``reps`` runs of each variant, interleaved; prints a line per run."""
    out: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i in range(reps):
        for v in variants:
            r = run_child(script, v, args)
            out[v].append(r)
            shown = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()
                     if not isinstance(x, list | dict)}
            print(f"  rep {i + 1}/{reps} {v:<10} {shown}", flush=True)
    return out


def median(runs: Sequence[dict[str, Any]], key: str) -> float:
    """The median of ``key`` over runs."""
    return statistics.median(r[key] for r in runs)


def machine() -> str:
    """A one-line description of this machine."""
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def final_line(**figures: float | int | str) -> None:
    """The benchmark's last line: ``name=value`` pairs."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in figures.items()), flush=True)


# -- paired measurement: every side round by round in one process ----------------------------

class ShoalJob:
    """FedAvg as ``shoal run`` builds it (central evaluation every round), run round by round."""

    def __init__(self, overrides: list[str], threads: int, dataset=None, seed: int = 0,
                 logs: str | None = None):
        from shoal.callbacks import CentralEvaluation
        from shoal.config import load_config
        from shoal.data.tasks import load_task
        from shoal.experiment import build_federated, initial_params, make_dataset, resolve_config
        from shoal.metrics import Evaluator
        from shoal.run import run

        self.threads = threads
        torch.set_num_threads(threads)
        config = load_config(None, [f"seed={seed}", "baseline=false", "data.eval_fraction=0",
                                    *overrides])
        task = load_task(config.task.name, **config.task.options)
        config = resolve_config(config, task)
        data = dataset(config, task) if dataset else make_dataset(config, task)
        model, self.params0 = initial_params(config, task)
        self.algorithm, self.transport = build_federated(config, task, data, model)
        evaluator = Evaluator(model, task.loss_fn, batch_size=config.evaluation.batch_size)
        self.callbacks: list = [CentralEvaluation(lambda p: evaluator(p, task.test))]
        if logs is not None:  # what `shoal run` adds: the metrics log, a checkpoint a round
            from shoal.callbacks import MetricsLog
            from shoal.checkpoint import Checkpoint
            self.callbacks += [MetricsLog(Path(logs) / "metrics.jsonl"),
                               Checkpoint(Path(logs) / "checkpoints")]
        self._run = run
        # One warm-up round outside the clock starts the worker processes (processes executor).
        run(self.algorithm, self.transport, rounds=1, params=self.params0)
        self.state = self.algorithm.init(self.params0)
        self.history: list[dict] = []

    def rounds(self, first: int, last: int) -> float:
        """Run rounds ``first..last`` on the job's threads; their wall time in seconds."""
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        res = self._run(self.algorithm, self.transport, rounds=last, state=self.state,
                        start_round=first, history=self.history, callbacks=self.callbacks)
        seconds = time.perf_counter() - t0
        self.state, self.history = res.state, res.history
        return seconds

    def result(self, seconds: float) -> dict:
        """The figures of the rounds run so far, taking ``seconds`` as their time."""
        self.transport.close()
        rounds = len(self.history)
        curve = [h["central/accuracy"] for h in self.history]
        return {"seconds": seconds, "rounds_per_s": rounds / seconds, "accuracy": curve[-1],
                "curve": curve, "peak_rss_gib": peak_rss_gib(),
                "round_s": statistics.median(h["time/round_s"] for h in self.history),
                "executor": repr(self.transport.executor)}


def in_turn(sides: dict[str, Callable[[int], float]], rounds: int) -> dict[str, float]:
    """Rounds ``1..rounds`` of every side in one process, round ``r`` of each in turn (the side
    that goes first rotates), so that all sides meet the same spells of a noisy machine; a side
    runs its round ``r`` and returns its seconds. Each side's total seconds."""
    seconds = dict.fromkeys(sides, 0.0)
    order = list(sides)
    for r in range(1, rounds + 1):
        i = (r - 1) % len(order)
        for v in order[i:] + order[:i]:
            seconds[v] += sides[v](r)
    return seconds


def timed_side(round_fn: Callable[[int], float], curve: list[float]) -> Callable[[int], float]:
    """A side for :func:`in_turn` from a hand-written loop's ``round_fn(r) -> accuracy``
    (appended to ``curve``)."""
    def side(r: int) -> float:
        t0 = time.perf_counter()
        curve.append(round_fn(r))
        return time.perf_counter() - t0
    return side


def job_side(job: ShoalJob) -> Callable[[int], float]:
    """A side for :func:`in_turn` that runs round ``r`` of a shoal job."""
    return lambda r: job.rounds(r, r)
