"""The dashboard app on a real uvicorn server on 127.0.0.1: the page, the snapshot, events as
rounds complete, read-only, and what hostile viewers can take."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from shoal.config import load_config
from shoal.dashboard import Dashboard, DashboardCallback, DashboardState
from shoal.errors import ConfigError
from shoal.experiment import run_experiment

from ._sse import events, serving


def _wait(predicate, timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_page_is_self_contained_and_the_snapshot_is_json() -> None:
    state = DashboardState("clinics")
    state.start_run("swarm", 4)
    with serving(state) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp  # only the page's own script runs (by its hash)
        body = page.text.lower()
        for external in ("http://", "https://", "src=", "href=", "@import"):
            assert external not in body, external  # works offline: nothing to fetch
        snap = http.get("/state")
        assert snap.status_code == 200 and snap.headers["cache-control"] == "no-store"
        data = snap.json()
        assert data["title"] == "clinics" and data["run"]["role"] == "peers"
        assert data["version"] == state.version
        assert http.head("/").status_code == 200 and http.head("/events").status_code == 200


def test_nothing_a_viewer_sends_changes_anything() -> None:
    state = DashboardState()
    state.start_run("federated", 3)
    with serving(state) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        version = state.version
        for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            for path in ("/", "/state", "/events", "/anything"):
                r = http.request(method, path, content=b'{"run": {"status": "hacked"}}')
                assert r.status_code == 405, (method, path)
                assert r.headers["allow"] == "GET, HEAD"
                assert "read-only" in r.text
        assert state.version == version
        assert http.get("/state").json()["run"]["status"] == "running"
        # A page of another site whose name was rebound to 127.0.0.1 reads nothing.
        for host in ("evil.example", "evil.example:8050", "127.0.0.1.evil.example"):
            r = http.get("/state", headers={"Host": host})
            assert r.status_code == 400 and "the dashboard answers to" in r.text, host
        for host in (f"localhost:{server.port}", f"[::1]:{server.port}", "127.0.0.1"):
            assert http.get("/state", headers={"Host": host}).status_code == 200, host


def test_events_arrive_as_the_rounds_of_a_real_run_complete(tmp_path, one_thread) -> None:
    """Each round of a real run is seen by an SSE viewer before the next round starts (the
    run waits for it here, in the test, to prove the order; the dashboard never makes it
    wait)."""
    state = DashboardState()
    seen: list[dict] = []
    arrived = threading.Condition()

    class Gate:  # after the dashboard's callback
        def after_round(self, ctx, report) -> None:
            with arrived:
                assert arrived.wait_for(
                    lambda: any(s["run"]["done"] == report.round for s in seen), timeout=10), \
                    f"round {report.round} did not reach the viewer"

    config = load_config(None, ["federated.rounds=3", "client.epochs=1",
                                "federated.clients_per_round=5", "baseline=false"])
    with serving(state) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("GET", "/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            errors: list[BaseException] = []

            def train() -> None:
                try:
                    run_experiment(config, tmp_path, callbacks=lambda p, r: [
                        DashboardCallback(state, p, r), Gate()])
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            runner = threading.Thread(target=train)
            for name, data in events(stream):
                assert name == "state"
                with arrived:
                    seen.append(data)
                    arrived.notify_all()
                if len(seen) == 1:
                    assert data["run"]["status"] == "idle"  # the current snapshot at once
                    runner.start()
                if data["run"]["status"] == "finished":
                    break
            runner.join(30)
            assert not errors, errors
    versions = [s["version"] for s in seen]
    assert versions == sorted(set(versions))
    done = [s["run"]["done"] for s in seen]
    assert {1, 2, 3} <= set(done) and done == sorted(done)
    final = seen[-1]
    assert [r["round"] for r in final["rounds"]] == [1, 2, 3]
    assert "central/accuracy" in final["rounds"][-1]["metrics"]
    assert final["nodes"]["connected"] == 20


def test_streams_over_the_limit_get_503_and_a_slot_frees_when_a_viewer_leaves() -> None:
    state = DashboardState()
    with serving(state, max_streams=2) as server, \
            httpx.Client(base_url=server.url, timeout=10) as http:
        opened = [http.stream("GET", "/events") for _ in range(2)]
        responses = [s.__enter__() for s in opened]
        readers = [events(r) for r in responses]  # one reader per stream, kept open
        try:
            for r, reader in zip(responses, readers, strict=True):
                assert r.status_code == 200
                assert next(reader)[0] == "state"
            assert server.app.state.events.open == 2
            refused = http.get("/events")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "10"
            assert "too many viewers: 2 event streams are open" in refused.text
            assert http.get("/state").status_code == 200  # snapshots are still served
            opened[0].__exit__(None, None, None)
            events_app = server.app.state.events
            _wait(lambda: events_app.open == 1, what="the closed stream to be released")
            with http.stream("GET", "/events") as again:
                assert again.status_code == 200
        finally:
            opened[1].__exit__(None, None, None)


def test_a_viewer_that_never_reads_blocks_neither_training_nor_other_viewers() -> None:
    """A viewer opens the event stream and stops reading: its socket fills up. Publishing
    stays fast, another viewer still gets the newest snapshot, and the stalled stream is
    dropped after send_timeout_s."""
    state = DashboardState(max_rounds=500)
    state.start_run("federated", 400)
    with serving(state, send_timeout_s=1.0) as server:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        stalled.connect(("127.0.0.1", server.port))
        stalled.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            _wait(lambda: server.app.state.events.open == 1, what="the stalled stream")
            metrics = {f"m/{i}": float(i) for i in range(60)}
            slowest = 0.0
            for r in range(1, 401):  # snapshots of ~100s of kB: the stalled socket fills
                t0 = time.perf_counter()
                state.round_finished(r, metrics)
                slowest = max(slowest, time.perf_counter() - t0)
                if r % 50 == 0:
                    time.sleep(0.05)  # let the server try to send
            assert slowest < 0.5, f"a publication took {slowest:.3f} s"
            with httpx.Client(base_url=server.url, timeout=10) as http:
                assert http.get("/state").json()["version"] == state.version
                with http.stream("GET", "/events") as other:
                    name, data = next(events(other))
                    assert data["version"] == state.version and data["run"]["done"] == 400
            # Training goes on; the stalled viewer takes nothing for send_timeout_s once its
            # buffers are full, and its slot is freed.
            r = 400

            def publish_and_check() -> bool:
                nonlocal r
                r += 1
                state.round_finished(r, metrics)
                time.sleep(0.02)
                return server.app.state.events.open == 0

            _wait(publish_and_check, timeout=30, what="the stalled stream to drop")
        finally:
            stalled.close()


def test_stopping_the_server_ends_the_streams() -> None:
    state = DashboardState()
    with serving(state) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        with http.stream("GET", "/events") as stream:
            it = events(stream)
            assert next(it)[0] == "state"
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            assert next(it)[0] == "end"
            stopper.join(10)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url, timeout=2)


def test_a_port_in_use_and_an_open_address_without_tls_are_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        board = Dashboard("x", port=port)
        with pytest.raises(ConfigError, match=rf"dashboard: cannot listen on 127.0.0.1:{port} "
                                              r"\(Address already in use\); another program"):
            board.start()
    with pytest.raises(ConfigError, match=r"dashboard: '0.0.0.0' is not a loopback address, "
                                          r"and without TLS"):
        Dashboard("x", host="0.0.0.0")
