"""The dashboard's state: what a real run publishes into it, and its bounds."""

from __future__ import annotations

import json
import threading
import time

import pytest

from shoal.config import load_config
from shoal.dashboard import DashboardCallback, DashboardState
from shoal.errors import ConfigError
from shoal.experiment import run_experiment

# A tiny federated run with simulated dropouts and DP-SGD (RDP accounting: fast).
RUN = ["federated.rounds=3", "client.epochs=1", "federated.clients_per_round=5",
       "baseline=false", "federated.dropout=0.3", "seed=3", "privacy.mode=sample",
       "privacy.noise_multiplier=1.0", "privacy.accountant=rdp"]


class _Record:
    """What the run reported, to compare the dashboard with."""

    def __init__(self) -> None:
        self.dropped: dict[int, dict[str, str]] = {}

    def after_round(self, ctx, report) -> None:
        self.dropped[report.round] = dict(report.dropped)


def test_the_callback_collects_a_real_run(tmp_path, one_thread) -> None:
    state = DashboardState("test")
    record = _Record()
    seen_versions: list[int] = []

    class Watch:  # after the dashboard's callback: the round is published by then
        def after_round(self, ctx, report) -> None:
            snap = state.snapshot()
            seen_versions.append(snap.version)
            assert snap.data["run"]["done"] == report.round
            assert snap.data["rounds"][-1]["round"] == report.round

    (result,) = run_experiment(
        load_config(None, RUN), tmp_path,
        callbacks=lambda p, r: [record, DashboardCallback(state, p, r, budget=10.0), Watch()])
    data = state.snapshot().data
    json.loads(state.snapshot().json)  # valid JSON (no NaN)
    assert data["run"]["paradigm"] == "federated" and data["run"]["role"] == "clients"
    assert (data["run"]["status"], data["run"]["done"], data["run"]["rounds"]) == (
        "finished", 3, 3)
    assert seen_versions == sorted(set(seen_versions))  # every round a newer version
    # The rounds hold the metrics the run recorded (evaluation included: the callback ran
    # after it), the final evaluation too.
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    for shown, logged in zip(data["rounds"], result.history, strict=True):
        for key in ("central/accuracy", "train/loss", "round/dropped", "dp/epsilon"):
            assert shown["metrics"][key] == pytest.approx(logged[key]), key
    # Dropouts: exactly the nodes the rounds dropped, with their reasons.
    assert sum(len(d) for d in record.dropped.values()) > 0  # the test needs some
    assert data["dropouts"] == [{"round": r, "node": n, "reason": why}
                                for r, d in sorted(record.dropped.items())
                                for n, why in sorted(d.items())]
    for r in data["rounds"]:
        assert r["dropped"] == record.dropped[r["round"]]
        assert r["metrics"]["round/dropped"] == len(record.dropped[r["round"]])
    nodes = {n["id"]: n for n in data["nodes"]["list"]}
    assert data["nodes"]["connected"] == 20 and len(nodes) == 20  # every simulated client
    for n, shown in nodes.items():
        rounds = [r for r, d in record.dropped.items() if n in d]
        assert shown["dropped"] == len(rounds), n
        assert shown["last_dropped"] == (max(rounds) if rounds else None), n
        assert shown["connected"], n
    # ε spent: the accountant's figure after the last round, and the budget given.
    assert data["privacy"]["epsilon"] == pytest.approx(result.history[-1]["dp/epsilon"])
    assert data["privacy"]["delta"] == pytest.approx(1e-5)
    assert data["privacy"]["budget"] == 10.0
    assert 0 < data["rounds"][0]["metrics"]["dp/epsilon"] < data["privacy"]["epsilon"]


def test_a_resumed_run_shows_its_earlier_rounds_and_a_new_run_keeps_a_summary() -> None:
    state = DashboardState()
    history = [{"round": r, "central/accuracy": r / 10} for r in (1, 2)]
    state.start_run("federated", 5, done=2, history=history)
    assert [r["round"] for r in state.snapshot().data["rounds"]] == [1, 2]
    assert state.snapshot().data["run"]["done"] == 2
    state.round_finished(3, {"central/accuracy": 0.3})
    state.end_run()
    state.start_run("centralized", 5)
    data = state.snapshot().data
    assert data["rounds"] == [] and data["run"]["label"] == "centralized"
    assert data["finished"] == [{"label": "federated", "rounds": 3, "status": "finished",
                                 "stopped": None, "final": {"central/accuracy": 0.3}}]


def test_the_state_is_bounded_whatever_is_published() -> None:
    state = DashboardState(max_rounds=3, max_metrics=4, max_nodes=2, max_events=5)
    state.start_run("federated", 100)
    hostile = "x" * 10_000
    sizes = []
    for r in range(1, 21):
        metrics = {f"zzz/{i}": float(i) for i in range(50)}
        metrics.update({"central/accuracy": 0.5, "train/loss": float("nan"),
                        "dp/epsilon": float(r), hostile: 1.0, "text": "not a number"})
        state.round_finished(r, metrics, {f"node-{i}-{hostile}": hostile for i in range(100)})
        sizes.append(len(state.snapshot().json))
    state.set_nodes([f"c{i}" for i in range(1000)])
    data = state.snapshot().data
    assert [r["round"] for r in data["rounds"]] == [18, 19, 20]
    assert data["rounds_evicted"] == 17
    last = data["rounds"][-1]
    # The most useful metrics first: evaluation and privacy before the rest; NaN and text
    # are left out (JSON has no NaN).
    assert list(last["metrics"])[:2] == ["central/accuracy", "dp/epsilon"]
    assert len(last["metrics"]) == 4 and "train/loss" not in last["metrics"]
    assert len(last["dropped"]) == 32 and last["dropped_more"] == 68
    assert all(len(k) <= 96 and len(v) <= 240 for k, v in last["dropped"].items())
    assert len(data["dropouts"]) == 5
    assert len(data["nodes"]["list"]) == 2 and data["nodes"]["connected"] == 1000
    assert data["nodes"]["untracked"] > 0
    assert data["privacy"]["epsilon"] == 20.0
    # What a viewer receives stops growing once the window is full (100 hostile 10 kB names
    # a round: about 40 kB in all).
    assert max(sizes[5:]) - min(sizes[5:]) < 64 and max(sizes) < 50_000


def test_publishing_never_waits_for_a_reader() -> None:
    """A reader holds a snapshot as long as it likes; publishers never wait for it, and the
    snapshot it holds never changes under it."""
    state = DashboardState()
    state.start_run("federated", 1000)
    held = state.snapshot()
    before = held.json
    stop = threading.Event()

    def reader() -> None:  # reads as fast as it can the whole time
        while not stop.is_set():
            state.snapshot().json  # noqa: B018

    t = threading.Thread(target=reader)
    t.start()
    try:
        t0 = time.perf_counter()
        for r in range(1, 201):
            state.round_finished(r, {"central/accuracy": r / 200})
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        t.join()
    assert held.json == before and held.data["rounds"] == []
    assert state.version == held.version + 200
    assert elapsed < 5.0


def test_bad_bounds_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"DashboardState: max_rounds must be >= 1 \(got 0\)"):
        DashboardState(max_rounds=0)
