"""What an honest-but-curious party received, kept with the run for audits afterwards.

:class:`CaptureViews` is a run callback: in the rounds it is given, it records every message
the watched node (the coordinator by default) receives — through a
:class:`~shoal.observe.Recorder` on the transport, so whatever executor ran the clients, it is
exactly what crossed — and writes the tensors to ``OUT/round-N.safetensors``, one key
``SENDER/KIND/NAME`` per tensor. ``shoal audit`` reads them back (:func:`load_views`).
Under secure aggregation the coordinator receives masked inputs, and that is what is kept.

The files hold clients' updates: they are as sensitive as what the coordinator saw, and stay
in the run directory, which the run's owner controls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ..message import COORDINATOR
from ..observe import Recorder
from ..run import Callback, RunContext
from ..tree import Params

__all__ = ["CaptureViews", "load_views", "observer"]


def observer(paradigm: str, dataset: Any) -> str:
    """Whose view a run captures: the coordinator's (federated), or the first peer's in sorted
    order (swarm: there is no coordinator; any peer receives the others' updates)."""
    return dataset.client_ids()[0] if paradigm == "swarm" else COORDINATOR


class CaptureViews(Callback):
    """Record what ``node`` (a coordinator or a peer) receives in ``rounds`` into ``out`` (see the module docstring)."""

    def __init__(self, rounds: Sequence[int], out: str | Path, node: str = COORDINATOR):
        self.rounds = set(int(r) for r in rounds)
        self.out = Path(out)
        self.node = node
        self.recorder: Recorder | None = None

    def __repr__(self) -> str:
        return f"CaptureViews(rounds={sorted(self.rounds)}, node={self.node!r})"

    def on_run_start(self, ctx: RunContext) -> None:
        """Watch the node on the run's transport."""
        observe = getattr(ctx.transport, "observe", None)
        if observe is not None:
            self.recorder = observe(Recorder(self.node))

    def before_round(self, ctx: RunContext, round: int) -> str | None:
        """Forget the previous round's messages."""
        if self.recorder is not None:
            self.recorder.clear()
        return None

    def after_round(self, ctx: RunContext, report: Any) -> str | None:
        """Write the round's received tensors when it is one of :attr:`rounds`."""
        if self.recorder is None or report.round not in self.rounds:
            return None
        tensors: Params = {}
        for m in self.recorder.received:
            for name, t in m.tensors.items():
                tensors[f"{m.src}/{m.kind}/{name}"] = t.detach().contiguous().clone()
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f"round-{report.round}.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.out / f"round-{report.round}.safetensors")
        return None


def load_views(path: str | Path) -> dict[tuple[str, str], Params]:
    """One captured round: ``(sender, kind) -> tensors``."""
    out: dict[tuple[str, str], Params] = {}
    for key, t in load_file(str(path)).items():
        sender, kind, name = key.split("/", 2)
        out.setdefault((sender, kind), {})[name] = t
    return out
