"""The dashboard as the ``shoal`` commands start it: ``shoal run --dashboard`` (plain HTTP on
this machine only) and ``shoal serve --dashboard`` (mutual TLS with the deployment's
certificates).

    with Dashboard.for_config(cfg, port=8050) as board:   # prints nothing; board.url
        run_experiment(cfg, run_dir, callbacks=lambda p, r: board.callbacks(p, r))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import Config
from ..errors import ConfigError
from .server import DashboardServer, is_loopback
from .state import DashboardCallback, DashboardState
from .tls import DashboardTLS

__all__ = ["DEFAULT_PORT", "Dashboard", "start_dashboard"]

DEFAULT_PORT = 8050
"""The port ``--dashboard`` listens on unless ``--dashboard-port`` says otherwise."""


class Dashboard:
    """A :class:`DashboardState` served by a :class:`DashboardServer`, with the callbacks
    that feed it; a context manager that starts and stops the server.

    Without ``tls`` the page is served over plain HTTP, and only on a loopback ``host``:
    anyone who could reach another address would see the run, unauthenticated (an SSH tunnel
    reaches a loopback port from afar). With ``tls`` (``shoal serve``) any host is allowed:
    only certificates from the project's CA get past the handshake, and only viewer
    certificates (``shoal ca enroll NAME --viewer``) are served; a training client's gets 403.
    """

    def __init__(self, title: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 tls: DashboardTLS | None = None, info: dict[str, Any] | None = None,
                 budget: float | None = None, **server_options: Any):
        if tls is None and not is_loopback(host):
            raise ConfigError(
                f"dashboard: {host!r} is not a loopback address, and without TLS the page "
                "would show the run to anyone who can reach it; keep the default 127.0.0.1 "
                f"(from elsewhere: ssh -L {port}:127.0.0.1:{port} THIS_HOST), or serve it over TLS "
                "(`shoal serve --dashboard` without --insecure), which requires a viewer "
                "certificate from the project's CA.")
        self.state = DashboardState(title)
        self.server = DashboardServer(self.state, host=host, port=port, tls=tls,
                                      **server_options)
        self.info = dict(info or {})
        self.budget = budget

    @classmethod
    def for_config(cls, config: Config, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                   tls: DashboardTLS | None = None, **server_options: Any) -> Dashboard:
        """A dashboard titled and described from ``config`` (task, paradigm, privacy)."""
        privacy = config.privacy
        info: dict[str, Any] = {"task": config.task.name, "paradigm": config.paradigm}
        if privacy.mode != "off":
            info["privacy"] = f"{privacy.mode} (δ = {privacy.delta:g})"
        if config.secagg.enabled:
            info["secure aggregation"] = "on"
        budget = privacy.target_epsilon if privacy.mode != "off" and privacy.target_epsilon \
            else None
        return cls(f"shoal · {config.task.name}", host=host, port=port, tls=tls, info=info,
                   budget=budget, **server_options)

    @property
    def url(self) -> str:
        """Where the page is (after :meth:`start`)."""
        return self.server.url

    def start(self) -> str:
        """Start serving; returns the URL."""
        return self.server.start()

    def stop(self) -> None:
        """Stop serving (viewers see that the dashboard closed)."""
        self.server.stop()

    def callbacks(self, paradigm: str, rounds: int, label: str | None = None,
                  ) -> list[DashboardCallback]:
        """The callbacks that publish a run of ``paradigm`` (put them last)."""
        return [DashboardCallback(self.state, paradigm, rounds, label=label, info=self.info,
                                  budget=self.budget)]

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_dashboard(config: Config, echo: Callable[[str], Any], *, port: int = DEFAULT_PORT,
                    host: str = "127.0.0.1", deployment: bool = False) -> Dashboard:
    """Start the dashboard of a command running ``config`` and tell the user where it is
    (``echo``: a line printer); the caller stops it (:meth:`Dashboard.stop`).

    ``deployment`` (``shoal serve``): serve it with the coordinator's TLS files from
    ``config.network`` (:meth:`DashboardTLS.for_deployment`), unless ``network.insecure``."""
    tls = (DashboardTLS.for_deployment(config.network)
           if deployment and not config.network.insecure else None)
    board = Dashboard.for_config(config, host=host, port=port, tls=tls)
    url = board.start()
    if tls is None:
        echo(f"dashboard: {url} (read-only; this machine only)")
    else:
        echo(f"dashboard: {url} (read-only; mutual TLS: open it with a viewer certificate "
             f"from the project's CA, `shoal ca enroll NAME --viewer`; see docs/dashboard.md)")
    return board
