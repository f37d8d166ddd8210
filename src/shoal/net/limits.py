"""The bounds a deployment's coordinator puts on what remote parties can take from it.

* :func:`raise_fd_limit`, :func:`default_max_connections`: connections are capped below the
  file-descriptor limit, so idle or half-open connections cannot starve the coordinator of the
  files it writes (logs, checkpoints, the CRL);
* :class:`LogLimiter`: warnings about one node are rate-limited, so a flood of bad replies
  cannot fill the log;
* :class:`LateGrace`: once a round has its quorum of replies, stragglers get a grace period,
  so one stalled client cannot hold the round for the whole timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["FD_RESERVE", "LateGrace", "LogLimiter", "default_max_connections", "raise_fd_limit"]

log = logging.getLogger(__name__)

FD_RESERVE = 64
"""File descriptors always kept for the coordinator's own files (logs, checkpoints, the CRL)."""


def raise_fd_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit where the system allows
    it; the soft limit now (``None`` where there is none, or no ``resource`` module)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.info("could not raise the limit on open files from %d to %d (%s)", soft, want, e)
    return int(soft)


def default_max_connections(fd_limit: int | None) -> int:
    """The connection limit for a process that may open ``fd_limit`` files: a quarter of them
    (at least 64) kept for the coordinator's own files, at least 16 and at most 10,000."""
    if fd_limit is None:
        return 10_000
    return max(16, min(10_000, fd_limit - max(FD_RESERVE, fd_limit // 4)))



class LogLimiter:
    """At most ``limit`` warnings about one node per ``window`` seconds; then one line saying
    that further ones are suppressed, and when the window ends how many were."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit = limit
        self.window = window
        self._lock = threading.Lock()
        self._state: dict[str, list[float]] = {}  # node -> [window start, count, suppressed]

    def warning(self, node: str, msg: str, *args: Any) -> None:
        """Log ``msg % args`` as a warning about ``node`` unless over its rate."""
        now = time.monotonic()
        with self._lock:
            if len(self._state) > 4096:  # ids of the past: forget those whose window ended
                self._state = {k: v for k, v in self._state.items()
                               if now - v[0] < self.window}
            st = self._state.get(node)
            suppressed = 0
            if st is None or now - st[0] >= self.window:
                suppressed = int(st[2]) if st is not None else 0
                st = self._state[node] = [now, 0, 0]
            st[1] += 1
            emit, last = st[1] <= self.limit, st[1] == self.limit
            if not emit:
                st[2] += 1
        if suppressed:
            self._suppressed(node, suppressed)
        if emit:
            log.warning(msg, *args)
        if last:
            log.warning("node %s: %d warnings about it within %g s; suppressing more until the "
                        "%g s are over (max_warnings_per_node)", node, self.limit, self.window,
                        self.window)

    def flush(self, node: str) -> None:
        """Say how many warnings about ``node`` were suppressed so far (its stream ended)."""
        with self._lock:
            st = self._state.get(node)
            suppressed = int(st[2]) if st is not None else 0
            if st is not None:
                st[2] = 0
        if suppressed:
            self._suppressed(node, suppressed)

    def _suppressed(self, node: str, count: int) -> None:
        log.warning("node %s: %d more warning(s) about it were suppressed (at most %d per %g s, "
                    "max_warnings_per_node)", node, count, self.limit, self.window)


class LateGrace:
    """A batch's deadline after its quorum: once ``quorum`` of the requests have a valid
    (non-error) reply, the others get ``grace_s`` more, so one straggler cannot hold a round
    for the whole timeout. ``pending`` are the batch's outstanding requests, each with an
    ``event`` set when its ``reply`` arrived."""

    POLL_S = 0.05

    def __init__(self, quorum: int | None, grace_s: float | None, pending: Sequence[Any]):
        self.on = quorum is not None and grace_s is not None and len(pending) > quorum
        self.quorum = quorum or 0
        self.grace_s = grace_s or 0.0
        self.pending = pending
        self.until: float | None = None

    def _check(self) -> None:
        if self.on and self.until is None and sum(
                p.event.is_set() and p.reply is not None and p.reply.error is None
                for p in self.pending) >= self.quorum:
            self.until = time.monotonic() + self.grace_s

    def expired(self) -> bool:
        """Whether the grace has run out."""
        return self.until is not None and time.monotonic() >= self.until

    def wait(self, p: Any, deadline: float | None) -> bool:
        """Wait for ``p``'s reply until ``deadline`` or the end of the grace; whether it came."""
        while True:
            self._check()
            limits = [t for t in (deadline, self.until) if t is not None]
            left = None if not limits else min(limits) - time.monotonic()
            if left is not None and left <= 0:
                return p.event.is_set()
            step = left
            if self.on and self.until is None:  # poll: the quorum may come while we wait
                step = self.POLL_S if left is None else min(left, self.POLL_S)
            if p.event.wait(step):
                return True
