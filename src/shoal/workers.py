"""Worker processes that fail fast: spawned, watched, and never waited for in vain.

The processes executor and data-parallel training spawn workers (``multiprocessing``'s
``spawn``: each worker imports the script that started shoal). A worker that cannot start —
most often because that script has no ``if __name__ == "__main__":`` guard, so every worker
runs it again and dies in bootstrap — never says so on its own, and a coordinator waiting for it
would wait forever. Here every worker reports its start on a queue; the coordinator waits for
the reports while watching each worker's exit code, and stops within a second of a death with
the worker's rank, its exit code and the fix (the worker's own traceback is printed above by
the worker). A worker that dies mid-round breaks the collective the coordinator is in (gloo
sees the connection drop); :meth:`Workers.failure` turns that into the same kind of message.
Workers watch their parent and exit when it is gone, so a killed coordinator leaves no orphans.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

from .errors import WorkerError

__all__ = ["GUARD_FIX", "Workers", "report_started", "watch_parent"]

log = logging.getLogger(__name__)

GUARD_FIX = ("The usual cause: the script that starts shoal has no `if __name__ == "
             "\"__main__\":` guard, so every worker process, which imports the script, runs it "
             "again and dies. Put the code that starts the run under that guard.")


def watch_parent(interval: float = 1.0) -> None:
    """In a worker: exit as soon as the process that spawned it is gone (no orphans)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="shoal-watch-parent").start()


def report_started(ready: Any, rank: int, error: str | None = None) -> None:
    """In a worker: tell the coordinator it started (``error``: the traceback of a failed
    start)."""
    ready.put((rank, error))


class Workers:
    """Spawned worker processes, ranks ``1 .. n``: ``target(rank, ready, *args(rank))`` each,
    where the target calls :func:`report_started` once it runs."""

    def __init__(self, what: str, target: Callable[..., None], ranks: int,
                 args: Callable[[int], Sequence[Any]]):
        self.what = what
        ctx = mp.get_context("spawn")
        self.ready = ctx.Queue()
        self.procs: dict[int, Any] = {}
        for rank in range(1, ranks + 1):
            p = ctx.Process(target=target, args=(rank, self.ready, *args(rank)), daemon=True)
            p.start()
            self.procs[rank] = p

    def __len__(self) -> int:
        return len(self.procs)

    def wait_started(self, timeout: float = 600.0) -> None:
        """Return once every worker reported its start; raise :class:`WorkerError` as soon as
        one reports a failure, exits before reporting, or ``timeout`` seconds pass (the other
        workers are stopped then)."""
        started: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(started) < len(self.procs):
            try:
                rank, error = self.ready.get(timeout=0.25)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in self.procs.items()
                        if r not in started and p.exitcode is not None]
                if dead:
                    self.stop()
                    r, code = dead[0]
                    raise WorkerError(f"{self.what}: worker process {r} exited with code {code} "
                                      f"before it started (its error is printed above). "
                                      f"{GUARD_FIX}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise WorkerError(f"{self.what}: worker processes "
                                      f"{sorted(set(self.procs) - started)} did not start within "
                                      f"{timeout:g} s; they were stopped.") from None
                continue
            if error is not None:
                self.stop()
                raise WorkerError(f"{self.what}: worker process {rank} could not start:\n{error}")
            started.add(rank)

    def dead(self) -> list[tuple[int, int]]:
        """``(rank, exit code)`` of every worker that has exited."""
        return [(r, p.exitcode) for r, p in self.procs.items() if p.exitcode is not None]

    def failure(self, error: BaseException, grace: float = 2.0) -> WorkerError | None:
        """After a collective failed with ``error``: a :class:`WorkerError` naming the worker
        that died (waiting up to ``grace`` seconds for its exit to show), or ``None`` when every
        worker still runs (the error is something else)."""
        deadline = time.monotonic() + grace
        while not self.dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = self.dead()
        if not dead:
            return None
        r, code = dead[0]
        return WorkerError(f"{self.what}: worker process {r} died (exit code {code}) during a "
                           f"round; its output is above. The run stops here ({type(error).__name__}"
                           f": {str(error).splitlines()[0][:200]}); completed rounds are "
                           "checkpointed: continue with --resume once the cause is fixed.")

    def stop(self, grace: float = 0.1) -> None:
        """Terminate every worker that still runs and reap them all."""
        for p in self.procs.values():
            p.join(timeout=grace)
            if p.is_alive():
                p.terminate()
        for p in self.procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
