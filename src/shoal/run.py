"""``run``: the one training loop. Everything else is a callback.

    result = run(FedAvg(...), transport, params=params, rounds=20,
                 callbacks=[CentralEvaluation(...), MetricsLog(path), Checkpoint(dir)])

Each round: callbacks may stop the run before it (a privacy budget), the algorithm runs it, the
traffic and time are recorded, then every callback sees the report in order (evaluation adds
metrics, the log writes them, the checkpoint saves them) and may ask to stop after it.

Costs are complete: ``comm/*`` counts every message of the round — the algorithm's and those
of callbacks that talk to nodes (federated evaluation), added before the next callback sees the
report, so the log and the checkpoint hold the whole round's traffic — with ``comm/bytes/<kind>``
per message kind; ``time/clients_s`` is the compute time of the round's clients (simulation),
``time/coordinator_s`` the round's time outside the transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .algorithm import Algorithm, RoundReport
from .errors import ConfigError
from .transport import TrafficTotals, Transport
from .tree import Params

__all__ = ["Callback", "RunContext", "RunResult", "run", "traffic_metrics"]

log = logging.getLogger(__name__)


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
        start_round: int = 1, history: list[dict[str, Any]] | None = None,
        round_retries: int = 0) -> RunResult:
    """Run ``algorithm`` for rounds ``start_round..rounds`` over ``transport``.

    Start from ``params`` (a fresh run) or from ``state`` with ``start_round`` and ``history``
    (a resumed run). Callbacks need only implement the hooks they use (see :class:`Callback`).

    ``round_retries``: how often a round that failed for want of participants
    (``report.retry``: too few valid replies) is run again — ``before_round`` hooks first, so
    a deployment waits for its clients — before it is recorded as failed. A retried attempt is
    not counted as a round (its traffic is: ``comm/*`` covers every attempt, and
    ``round/retries`` says how many there were). Leave it at 0 under differential privacy:
    every attempt releases updates, and the accountant counts rounds, not attempts.
    """
    if round_retries < 0:
        raise ConfigError(f"run: round_retries must be >= 0 (got {round_retries}).")
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
        busy = transport.busy_s
        t0 = time.perf_counter()
        attempt = 0
        ctx.state, report = algorithm.round(ctx.state, transport, r)
        while report.failed and report.retry and attempt < round_retries:
            attempt += 1
            log.warning("round %d: %s; running it again (retry %d of %d)", r, report.failed,
                        attempt, round_retries)
            stopped = _first(_call(callbacks, "before_round", ctx, r))
            if stopped:
                break
            ctx.state, report = algorithm.round(ctx.state, transport, r)
        if stopped:
            break
        seconds = time.perf_counter() - t0
        report.metrics = {"round": r, **report.metrics, "time/round_s": seconds,
                          "time/coordinator_s": max(seconds - (transport.busy_s - busy), 0.0)}
        if attempt:
            report.metrics["round/retries"] = float(attempt)
        own = transport.stats.since(before)
        traffic_metrics(report.metrics, own)
        if report.failed:
            report.metrics["round/failed"] = 1.0
        ctx.round = r
        # The history holds the same dict the callbacks add to, so a checkpoint taken by a
        # later callback already contains this round's evaluation metrics (and traffic).
        ctx.history.append(report.metrics)
        stops = []
        for cb in callbacks:
            hook = getattr(cb, "after_round", None)
            if hook is None:
                continue
            messages = transport.stats.messages_down + transport.stats.messages_peer
            stops.append(hook(ctx, report))
            if transport.stats.messages_down + transport.stats.messages_peer != messages:
                traffic_metrics(report.metrics, transport.stats.since(before), own)
        stopped = _first(stops)
        if stopped:
            break
    _call(callbacks, "on_run_end", ctx)
    return RunResult(ctx.state, ctx.history, ctx.round, stopped, time.perf_counter() - started)


def traffic_metrics(into: dict[str, Any], traffic: TrafficTotals,
                    algorithm: TrafficTotals | None = None) -> None:
    """Write a round's traffic into its metrics: ``comm/bytes_down`` (sent by the coordinator),
    ``comm/bytes_up`` (received by it), ``comm/bytes_peer`` (node to node), the message counts,
    ``comm/bytes/<kind>`` per message kind, ``time/clients_s`` (the nodes' compute) and, when
    ``algorithm`` (the algorithm's own part of ``traffic``) is given, ``comm/bytes_evaluation``:
    what the callbacks sent and received (federated evaluation)."""
    into["comm/bytes_down"] = float(traffic.bytes_down)
    into["comm/bytes_up"] = float(traffic.bytes_up)
    into["comm/messages_down"] = float(traffic.messages_down)
    into["comm/messages_up"] = float(traffic.messages_up)
    if traffic.messages_peer:
        into["comm/bytes_peer"] = float(traffic.bytes_peer)
        into["comm/messages_peer"] = float(traffic.messages_peer)
    for kind, (_, nbytes) in sorted(traffic.kinds.items()):
        into[f"comm/bytes/{kind}"] = float(nbytes)
    into["time/clients_s"] = traffic.compute_s
    if algorithm is not None:
        into["comm/bytes_evaluation"] = float(
            (traffic.bytes_down + traffic.bytes_up + traffic.bytes_peer)
            - (algorithm.bytes_down + algorithm.bytes_up + algorithm.bytes_peer))


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> list[Any]:
    return [getattr(cb, hook)(*args) for cb in callbacks if hasattr(cb, hook)]


def _first(reasons: list[Any]) -> str | None:
    return next((r for r in reasons if r), None)
