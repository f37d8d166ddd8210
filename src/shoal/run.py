"""``run``: the one training loop. Everything else is a callback.

    result = run(FedAvg(...), transport, params=params, rounds=20,
                 callbacks=[CentralEvaluation(...), MetricsLog(path), Checkpoint(dir)])

Each round: callbacks may stop the run before it (a privacy budget), the algorithm runs it, the
traffic and time are recorded, then every callback sees the report in order (evaluation adds
metrics, the log writes them, the checkpoint saves them) and may ask to stop after it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .algorithm import Algorithm, RoundReport
from .errors import ConfigError
from .transport import Transport
from .tree import Params

__all__ = ["Callback", "RunContext", "RunResult", "run"]


@dataclass
class RunContext:
    """What callbacks can see: the algorithm, the transport, the current state, the last
    completed round and the metrics history (one dict per round, with a ``"round"`` key)."""

    algorithm: Algorithm[Any]
    transport: Transport
    state: Any
    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def params(self) -> Params:
        """The current global params."""
        return self.algorithm.params(self.state)


class Callback:
    """Base class of callbacks; every hook does nothing by default.

    ``before_round`` and ``after_round`` return a reason to stop the run, or ``None``.
    ``after_round`` may add metrics to ``report.metrics``.
    """

    def on_run_start(self, ctx: RunContext) -> None:
        """Called once, before the first round of this (possibly resumed) run."""

    def before_round(self, ctx: RunContext, round: int) -> str | None:
        """Called before ``round``; a returned reason stops the run before it."""
        return None

    def after_round(self, ctx: RunContext, report: RoundReport) -> str | None:
        """Called after each round; a returned reason stops the run after it."""
        return None

    def on_run_end(self, ctx: RunContext) -> None:
        """Called once, after the last round (or the stop)."""


@dataclass
class RunResult:
    """The final state, the metrics history, and why the run stopped early (if it did)."""

    state: Any
    history: list[dict[str, Any]]
    rounds: int
    stopped: str | None = None
    seconds: float = 0.0


def run(algorithm: Algorithm[Any], transport: Transport, *, rounds: int,
        params: Params | None = None, callbacks: Sequence[Any] = (), state: Any = None,
        start_round: int = 1, history: list[dict[str, Any]] | None = None) -> RunResult:
    """Run ``algorithm`` for rounds ``start_round..rounds`` over ``transport``.

    Start from ``params`` (a fresh run) or from ``state`` with ``start_round`` and ``history``
    (a resumed run). Callbacks need only implement the hooks they use (see :class:`Callback`).
    """
    if (params is None) == (state is None):
        raise ConfigError("run: pass exactly one of params (a new run) or state (a resumed run).")
    if rounds < 0 or start_round < 1:
        raise ConfigError(f"run: rounds must be >= 0 and start_round >= 1 "
                          f"(got rounds={rounds}, start_round={start_round}).")
    ctx = RunContext(algorithm, transport,
                     state if state is not None else algorithm.init(params),  # type: ignore[arg-type]
                     start_round - 1, list(history or []))
    started = time.perf_counter()
    _call(callbacks, "on_run_start", ctx)
    stopped: str | None = None
    for r in range(start_round, rounds + 1):
        stopped = _first(_call(callbacks, "before_round", ctx, r))
        if stopped:
            break
        before = transport.stats.snapshot()
        t0 = time.perf_counter()
        ctx.state, report = algorithm.round(ctx.state, transport, r)
        seconds = time.perf_counter() - t0
        traffic = transport.stats.since(before)
        report.metrics = {"round": r, **report.metrics,
                          "comm/bytes_down": float(traffic.bytes_down),
                          "comm/bytes_up": float(traffic.bytes_up),
                          "time/round_s": seconds}
        if report.failed:
            report.metrics["round/failed"] = 1.0
        ctx.round = r
        # The history holds the same dict the callbacks add to, so a checkpoint taken by a
        # later callback already contains this round's evaluation metrics.
        ctx.history.append(report.metrics)
        stopped = _first(_call(callbacks, "after_round", ctx, report))
        if stopped:
            break
    _call(callbacks, "on_run_end", ctx)
    return RunResult(ctx.state, ctx.history, ctx.round, stopped, time.perf_counter() - started)


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> list[Any]:
    return [getattr(cb, hook)(*args) for cb in callbacks if hasattr(cb, hook)]


def _first(reasons: list[Any]) -> str | None:
    return next((r for r in reasons if r), None)
