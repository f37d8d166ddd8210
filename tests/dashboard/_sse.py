"""Helpers for the dashboard tests: a server over a state, and a reader of server-sent events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from shoal.dashboard import DashboardServer, DashboardState


@contextmanager
def serving(state: DashboardState, **kw: Any) -> Iterator[DashboardServer]:
    """A real uvicorn server over ``state`` on 127.0.0.1, on a port the OS picks."""
    server = DashboardServer(state, host="127.0.0.1", port=0, **kw)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """``(event, data)`` for each server-sent event of a streamed response (comments and the
    ``retry`` field skipped); ``data`` is parsed JSON."""
    name, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith(":") or line.startswith("retry:") or line.startswith("id:"):
            continue
        elif line.startswith("event:"):
            name = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            data.append(line.partition(":")[2].strip())
