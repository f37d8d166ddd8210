"""The live dashboard: a read-only web page of a run as it happens.

``shoal run --dashboard`` and ``shoal serve --dashboard`` serve it: connected nodes or peers,
round progress, metrics as they arrive, dropouts and ε spent, pushed to the browser with
server-sent events. Under ``shoal serve`` it is behind the deployment's TLS, for viewers with a
viewer certificate the project's CA issued (``shoal ca enroll NAME --viewer``; a training
client's certificate is refused). See ``docs/dashboard.md``.

    state        DashboardState (bounded, versioned snapshots), DashboardCallback (a run callback)
    app          create_app: the Starlette app (``/``, ``/events``, ``/state``; GET only)
    page         the self-contained page and its Content-Security-Policy
    server       DashboardServer: uvicorn in a background thread
    tls          DashboardTLS: the deployment's certificates, client certificates required, CRL
                 (the viewer role is checked by the app: ``create_app(viewers_only=True)``)
    launch       Dashboard: what the commands start
"""

from .app import create_app
from .launch import DEFAULT_PORT, Dashboard
from .server import DashboardServer
from .state import DashboardCallback, DashboardState, Snapshot
from .tls import DashboardTLS

__all__ = ["DEFAULT_PORT", "Dashboard", "DashboardCallback", "DashboardServer", "DashboardState",
           "DashboardTLS", "Snapshot", "create_app"]
