"""What the live dashboard shows: a bounded, versioned, in-memory picture of a run.

Training publishes into :class:`DashboardState` (through :class:`DashboardCallback`, a
:func:`shoal.run.run` callback); viewers read :class:`Snapshot` objects. The two never wait on
each other:

* every publication builds a new immutable :class:`Snapshot` and swaps one reference, so a
  reader takes the current snapshot without a lock and a publisher never waits on a reader (a
  lock orders publishers only: the training thread and the node poller);
* a snapshot is serialised to JSON at most once, lazily, by the first viewer that asks, never on
  the training thread;
* everything is bounded: the last ``max_rounds`` rounds, ``max_metrics`` numbers per round,
  ``max_nodes`` node records, ``max_events`` recent dropouts, and truncated names and reasons,
  so neither a long run nor a hostile node id makes the state (or a viewer's event) grow
  without limit.

Metrics shown are the round's report as the other callbacks left it (evaluation included: the
callback runs last), ``round/dropped`` and the report's ``dropped`` map for dropouts, and
``dp/epsilon`` / ``dp/delta`` (and any ``privacy/*`` figure) for the privacy spent.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..algorithm import RoundReport
from ..errors import ConfigError
from ..run import Callback, RunContext

__all__ = ["DashboardCallback", "DashboardState", "Snapshot"]

log = logging.getLogger(__name__)

_MAX_KEY = 96  # characters of a metric name or node id kept
_MAX_TEXT = 240  # characters of a reason kept
_MAX_DROPPED_PER_ROUND = 32
_MAX_PRIVACY_KEYS = 16
_MAX_FINISHED = 16
# Metrics kept first when a round has more than max_metrics (by prefix, in this order).
_PRIORITY = ("round", "central/", "fed_eval/", "dp/", "privacy/", "train/", "round/",
             "update/", "time/", "comm/")


def _clip(text: object, limit: int) -> str:
    s = str(text)
    return s if len(s) <= limit else s[:limit - 1] + "…"


def _number(value: object) -> float | None:
    """``value`` as a finite float; ``None`` for NaN, infinities and anything not a number
    (JSON has no NaN, and a browser's JSON.parse refuses it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _rank(key: str) -> int:
    for i, prefix in enumerate(_PRIORITY):
        if key == prefix or (prefix.endswith("/") and key.startswith(prefix)):
            return i
    return len(_PRIORITY)


@dataclass(frozen=True)
class Snapshot:
    """One published picture of the run: ``version`` (increases with every publication) and
    ``data`` (plain dicts and lists; never changed after publication)."""

    version: int
    data: Mapping[str, Any]

    @cached_property
    def json(self) -> str:
        """``data`` as one line of JSON (computed once, by the first viewer that asks)."""
        return json.dumps(self.data, separators=(",", ":"), allow_nan=False)


@dataclass
class _Node:
    id: str
    connected: bool = False
    dropped: int = 0
    last_dropped: int | None = None
    reason: str | None = None

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "connected": self.connected, "dropped": self.dropped,
                "last_dropped": self.last_dropped, "reason": self.reason}


@dataclass
class _Run:
    label: str = ""
    paradigm: str = ""
    role: str = "clients"
    rounds: int = 0
    done: int = 0
    current: int | None = None
    status: str = "idle"
    stopped: str | None = None
    started: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {"label": self.label, "paradigm": self.paradigm, "role": self.role,
                "rounds": self.rounds, "done": self.done, "current": self.current,
                "status": self.status, "stopped": self.stopped, "started": self.started,
                "info": dict(self.info)}


class DashboardState:
    """The run's picture for the dashboard; see the module docstring.

    ``title`` heads the page. The bounds: ``max_rounds`` rounds kept (older ones are counted
    in ``rounds_evicted``), ``max_metrics`` metrics per round, ``max_nodes`` node records,
    ``max_events`` recent dropouts. Publishing methods (:meth:`start_run`,
    :meth:`round_started`, :meth:`round_finished`, :meth:`set_nodes`, :meth:`end_run`) may be
    called from any thread; :meth:`snapshot` never blocks.
    """

    def __init__(self, title: str = "shoal", *, max_rounds: int = 200, max_metrics: int = 64,
                 max_nodes: int = 256, max_events: int = 100):
        for name, value in (("max_rounds", max_rounds), ("max_metrics", max_metrics),
                            ("max_nodes", max_nodes), ("max_events", max_events)):
            if value < 1:
                raise ConfigError(f"DashboardState: {name} must be >= 1 (got {value}).")
        self.title = _clip(title, _MAX_TEXT)
        self.max_rounds = max_rounds
        self.max_metrics = max_metrics
        self.max_nodes = max_nodes
        self.max_events = max_events
        self._lock = threading.Lock()  # orders publishers; readers never take it
        self._version = 0
        self._run = _Run()
        self._rounds: deque[dict[str, Any]] = deque(maxlen=max_rounds)
        self._evicted = 0
        self._nodes: dict[str, _Node] = {}
        self._connected = 0
        self._untracked: set[str] = set()  # ids seen beyond max_nodes (counted, bounded below)
        self._dropouts: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._privacy: dict[str, float] = {}
        self._budget: float | None = None
        self._finished: deque[dict[str, Any]] = deque(maxlen=_MAX_FINISHED)
        self._nodes_fn: Callable[[], Sequence[str]] | None = None
        self._snapshot = Snapshot(0, self._build())  # version 0: nothing published yet

    # -- reading -----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The version of the current snapshot (0 before anything was published)."""
        return self._snapshot.version

    def snapshot(self) -> Snapshot:
        """The current snapshot (one reference read: no lock, never waits)."""
        return self._snapshot

    # -- publishing --------------------------------------------------------------------------

    def start_run(self, paradigm: str, rounds: int, *, done: int = 0, label: str | None = None,
                  role: str | None = None, history: Sequence[Mapping[str, Any]] = (),
                  info: Mapping[str, Any] | None = None, budget: float | None = None) -> None:
        """A run of ``paradigm`` (``rounds`` in all, ``done`` of them already: a resumed run,
        whose ``history`` fills the rounds table) starts. ``role`` names its nodes
        (``"peers"`` for swarm, else ``"clients"``); ``info`` adds a few facts to show (the
        task, the privacy mode); ``budget`` is the privacy budget ε, when there is one. A run
        shown before is kept as a one-line summary."""
        with self._lock:
            if self._run.status != "idle" and self._run.paradigm:
                self._finish_current()
            self._run = _Run(
                label=_clip(label or paradigm, _MAX_KEY), paradigm=_clip(paradigm, _MAX_KEY),
                role=_clip(role or ("peers" if paradigm == "swarm" else "clients"), _MAX_KEY),
                rounds=int(rounds), done=int(done), status="running", started=time.time(),
                info={_clip(k, _MAX_KEY): _clip(v, _MAX_TEXT) for k, v in
                      list((info or {}).items())[:16]})
            self._rounds.clear()
            self._evicted = 0
            self._dropouts.clear()
            self._nodes.clear()  # a new run: its own nodes and dropout counts
            self._untracked.clear()
            self._connected = 0
            self._privacy = {}
            self._budget = _number(budget) if budget else None
            for h in list(history)[-self.max_rounds:]:
                r = h.get("round")
                if isinstance(r, int | float) and not isinstance(r, bool):
                    self._add_round(int(r), h, {}, "failed" if "round/failed" in h else None)
            self._evicted = max(0, len(history) - self.max_rounds)
            self._publish()

    def round_started(self, round: int) -> None:
        """Round ``round`` is running."""
        with self._lock:
            self._run.current = int(round)
            self._publish()

    def round_finished(self, round: int, metrics: Mapping[str, Any],
                       dropped: Mapping[str, str] | None = None,
                       failed: str | None = None) -> None:
        """Round ``round`` ended with ``metrics``; ``dropped`` maps the nodes that were asked
        but did not count to the reason; ``failed`` says why its update was not applied."""
        with self._lock:
            self._add_round(int(round), metrics, dict(dropped or {}), failed)
            self._run.done = max(self._run.done, int(round))
            self._run.current = None
            self._publish()

    def set_nodes(self, node_ids: Sequence[str]) -> None:
        """The nodes connected (reachable) now; publishes only when something changed."""
        with self._lock:
            if self._apply_nodes(node_ids):
                self._publish()

    def end_run(self, stopped: str | None = None, *,
                metrics: Mapping[str, Any] | None = None) -> None:
        """The run is over (``stopped``: why it stopped early); ``metrics`` replaces the last
        round's metrics (a final evaluation added after it)."""
        with self._lock:
            if metrics is not None and self._rounds:
                last = self._rounds[-1]
                self._rounds[-1] = {**last, "metrics": self._metrics(metrics)}
                self._note_privacy(metrics)
            self._run.status = "stopped" if stopped else "finished"
            self._run.stopped = _clip(stopped, _MAX_TEXT) if stopped else None
            self._run.current = None
            self._publish()

    def watch_nodes(self, nodes_fn: Callable[[], Sequence[str]] | None) -> None:
        """Sample the connected nodes with ``nodes_fn`` at every :meth:`refresh_nodes` (a
        transport's ``nodes``); ``None`` stops sampling."""
        self._nodes_fn = nodes_fn

    def refresh_nodes(self) -> None:
        """Sample the nodes now (the server's poller calls this every second or so). The
        sample is taken outside the publishers' lock; a failing ``nodes_fn`` is logged."""
        fn = self._nodes_fn
        if fn is None:
            return
        try:
            ids = list(fn())
        except Exception as e:  # the transport is closing, or broken: the run reports that
            log.debug("dashboard: sampling the nodes failed: %s", e)
            return
        self.set_nodes(ids)

    # -- internals (called with the lock held) -----------------------------------------------

    def _metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        kept: list[tuple[int, int, str, float]] = []
        for i, (k, v) in enumerate(metrics.items()):
            value = _number(v)
            if value is None or not isinstance(k, str):
                continue
            kept.append((_rank(k), i, _clip(k, _MAX_KEY), value))
        kept.sort()
        return {k: v for _, _, k, v in kept[:self.max_metrics]}

    def _note_privacy(self, metrics: Mapping[str, Any]) -> None:
        for k, v in metrics.items():
            if not isinstance(k, str) or not (k in ("dp/epsilon", "dp/delta")
                                              or k.startswith("privacy/")):
                continue
            value = _number(v)
            if value is not None and (k in self._privacy
                                      or len(self._privacy) < _MAX_PRIVACY_KEYS):
                self._privacy[_clip(k, _MAX_KEY)] = value

    def _add_round(self, round: int, metrics: Mapping[str, Any], dropped: dict[str, str],
                   failed: str | None) -> None:
        names = sorted(dropped)
        shown = {_clip(n, _MAX_KEY): _clip(dropped[n], _MAX_TEXT)
                 for n in names[:_MAX_DROPPED_PER_ROUND]}
        entry = {"round": round, "metrics": self._metrics(metrics), "dropped": shown,
                 "dropped_more": max(0, len(names) - _MAX_DROPPED_PER_ROUND),
                 "failed": _clip(failed, _MAX_TEXT) if failed else None, "time": time.time()}
        if self._rounds and self._rounds[-1]["round"] == round:  # a retried or amended round
            self._rounds[-1] = entry
        else:
            if len(self._rounds) == self.max_rounds:
                self._evicted += 1
            self._rounds.append(entry)
        for name in names:
            reason = _clip(dropped[name], _MAX_TEXT)
            self._dropouts.append({"round": round, "node": _clip(name, _MAX_KEY),
                                   "reason": reason})
            node = self._node(name)
            if node is not None:
                node.dropped += 1
                node.last_dropped = round
                node.reason = reason
        self._note_privacy(metrics)

    def _node(self, node_id: str) -> _Node | None:
        key = _clip(node_id, _MAX_KEY)
        node = self._nodes.get(key)
        if node is None:
            if len(self._nodes) >= self.max_nodes:
                if len(self._untracked) < 64 * self.max_nodes:
                    self._untracked.add(key)
                return None
            node = self._nodes[key] = _Node(key)
        return node

    def _apply_nodes(self, node_ids: Sequence[str]) -> bool:
        now = {_clip(i, _MAX_KEY) for i in node_ids}
        changed = len(now) != self._connected
        self._connected = len(now)
        for key in sorted(now):
            if key not in self._nodes and len(self._nodes) < self.max_nodes:
                self._nodes[key] = _Node(key)
                changed = True
        for key, node in self._nodes.items():
            if node.connected != (key in now):
                node.connected = key in now
                changed = True
        return changed

    def _finish_current(self) -> None:
        last = self._rounds[-1]["metrics"] if self._rounds else {}
        self._finished.append({
            "label": self._run.label, "rounds": self._run.done, "status": self._run.status,
            "stopped": self._run.stopped,
            "final": {k: v for k, v in last.items()
                      if k.startswith(("central/", "dp/epsilon"))}})

    def _build(self) -> dict[str, Any]:
        nodes = sorted(self._nodes.values(), key=lambda n: n.id)
        return {
            "version": self._version,
            "title": self.title,
            "updated": time.time(),
            "run": self._run.view(),
            "nodes": {"connected": self._connected, "list": [n.view() for n in nodes],
                      "untracked": len(self._untracked)},
            "rounds": list(self._rounds),  # entries are never changed once added
            "rounds_evicted": self._evicted,
            "dropouts": list(self._dropouts),
            "privacy": {"epsilon": self._privacy.get("dp/epsilon"),
                        "delta": self._privacy.get("dp/delta"), "budget": self._budget,
                        "figures": dict(self._privacy)},
            "finished": list(self._finished),
            "limits": {"max_rounds": self.max_rounds, "max_metrics": self.max_metrics,
                       "max_nodes": self.max_nodes, "max_events": self.max_events},
        }

    def _publish(self) -> None:
        self._version += 1
        data = self._build()
        self._snapshot = Snapshot(self._version, data)  # one reference swap: readers see
        # either the old snapshot or the new one, whole


class DashboardCallback(Callback):
    """A :func:`shoal.run.run` callback publishing the run into ``state``.

    Put it last among the callbacks, so the metrics it publishes are complete (evaluation
    included); ``shoal run --dashboard`` and ``shoal serve --dashboard`` do. ``paradigm`` and
    ``rounds`` label the run (``label`` overrides the shown name, e.g. with the seed);
    ``info`` and ``budget`` go to :meth:`DashboardState.start_run`. The transport's connected
    nodes are sampled at each round and, between rounds, by the dashboard server's poller.

    The dashboard never stops or fails a run: a publication that raises is logged once and
    skipped.
    """

    def __init__(self, state: DashboardState, paradigm: str, rounds: int, *,
                 label: str | None = None, info: Mapping[str, Any] | None = None,
                 budget: float | None = None):
        self.state = state
        self.paradigm = paradigm
        self.rounds = rounds
        self.label = label
        self.info = dict(info or {})
        self.budget = budget
        self._warned = False

    def _safe(self, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            if not self._warned:
                self._warned = True
                log.warning("the dashboard could not publish (the run goes on; further "
                            "failures are not logged)", exc_info=True)

    def on_run_start(self, ctx: RunContext) -> None:
        """Publish the run's start (with the rounds done before, when resumed)."""
        self.state.watch_nodes(ctx.transport.nodes)
        self._safe(self.state.start_run, self.paradigm, self.rounds, done=ctx.round,
                   label=self.label, history=ctx.history, info=self.info, budget=self.budget)
        self._safe(self.state.refresh_nodes)

    def before_round(self, ctx: RunContext, round: int) -> None:
        """Publish that ``round`` runs."""
        self._safe(self.state.round_started, round)

    def after_round(self, ctx: RunContext, report: RoundReport) -> None:
        """Publish the round's metrics, dropouts and failure."""
        self._safe(self.state.round_finished, report.round, report.metrics, report.dropped,
                   report.failed)
        self._safe(self.state.refresh_nodes)

    def on_run_end(self, ctx: RunContext) -> None:
        """Publish the end of the run, with the last round's final metrics."""
        stopped = None
        if ctx.history and ctx.round < self.rounds:
            stopped = f"stopped after round {ctx.round} of {self.rounds}"
        self._safe(self.state.end_run, stopped,
                   metrics=ctx.history[-1] if ctx.history else None)
        self.state.watch_nodes(None)
