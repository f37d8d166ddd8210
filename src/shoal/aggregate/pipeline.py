"""``Pipeline``: the aggregation chain, visible in one expression.

    Pipeline([clip_by_norm(1.0)], weighted_mean())

Per round: each client's update goes through the stages' per-update halves (in order; those
with ``runs_at="client"`` on the client, the others at the coordinator), the reducer turns the
updates into one, and the stages' server halves run on the result in reverse order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import AggregationError
from ..tree import Params
from ..types import ClientInfo, RoundInfo
from .fold import Fold
from .reducers import Reducer, weighted_mean
from .stages import Stage, StageState

__all__ = ["Pipeline"]


class Pipeline:
    """Stages plus a reducer; see the module docstring.

    A stage whose ``hides_individual_updates`` is true (secure aggregation) reveals only sums to
    the coordinator, so it can be combined only with a linear reducer and no coordinator-side
    stage; anything else fails here, at construction.
    """

    def __init__(self, stages: Sequence[Stage] = (), reducer: Reducer | None = None):
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.reducer: Reducer = reducer if reducer is not None else weighted_mean()
        for s in self.stages:
            if not isinstance(s, Stage):
                raise AggregationError(
                    f"Pipeline: {s!r} is a {type(s).__name__}, expected a Stage "
                    "(e.g. clip_by_norm(1.0))."
                )
        if not isinstance(self.reducer, Reducer):
            raise AggregationError(
                f"Pipeline: reducer {self.reducer!r} is a {type(self.reducer).__name__}, "
                "expected a Reducer (e.g. weighted_mean())."
            )
        self._check_secrecy()
        for s in self.stages:
            s.check_reducer(self.reducer)

    def _check_secrecy(self) -> None:
        hiding = [s for s in self.stages if getattr(s, "hides_individual_updates", False)]
        if not hiding:
            return
        secret = hiding[0]
        if not self.reducer.linear:
            raise AggregationError(
                f"{self.reducer!r} needs individual updates, but {secret!r} reveals only their "
                "sum; use weighted_mean()."
            )
        for s in self.stages:
            if s.runs_at == "coordinator":
                raise AggregationError(
                    f"{s!r} runs on each update at the coordinator, but {secret!r} reveals only "
                    "their sum; run it on the clients (runs_at='client')."
                )

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(repr(s) for s in self.stages)}], {self.reducer!r})"

    @property
    def extra_tensors(self) -> Params:
        """Tensors the stages add to each update besides the model's (name -> template)."""
        out: Params = {}
        for s in self.stages:
            out.update(s.extra_tensors())
        return out

    def update_template(self, params: Params) -> Params:
        """What one client's update must hold after the client-side stages: a tensor per model
        parameter plus the stages' :attr:`extra_tensors` (names, shapes and dtypes)."""
        return {**params, **self.extra_tensors}

    @property
    def client_stages(self) -> tuple[Stage, ...]:
        """The stages whose per-update half runs on the clients."""
        return tuple(s for s in self.stages if s.runs_at == "client")

    def init(self) -> list[StageState]:
        """Every stage's server state before the first round."""
        return [s.init() for s in self.stages]

    def client_configs(self, states: Sequence[StageState]) -> list[dict[str, Any]]:
        """What each stage's per-update half needs this round (sent to the clients)."""
        return [s.client_config(st) for s, st in zip(self.stages, states, strict=True)]

    def client(self, update: Params, configs: Sequence[Mapping[str, Any]],
               info: ClientInfo) -> Params:
        """Run the client-side per-update halves, in order (on the client)."""
        return self._per_update("client", update, configs, info)

    def coordinator(self, update: Params, configs: Sequence[Mapping[str, Any]],
                    info: ClientInfo) -> Params:
        """Run the coordinator-side per-update halves, in order, on one received update."""
        return self._per_update("coordinator", update, configs, info)

    def _per_update(self, where: str, update: Params, configs: Sequence[Mapping[str, Any]],
                    info: ClientInfo) -> Params:
        for s, cfg in zip(self.stages, configs, strict=True):
            if s.runs_at == where:
                update = s.client(update, cfg, info)
        return update

    def fold(self, template: Params) -> Fold:
        """An empty :class:`~shoal.aggregate.Fold` of updates shaped like ``template`` (see
        :meth:`update_template`) for this pipeline's reducer."""
        return Fold(self.reducer, template)

    def reduce(self, updates: Iterable[tuple[str, Params, float]],
               configs: Sequence[Mapping[str, Any]], round: int, seed: int,
               ) -> tuple[Params | None, int]:
        """Coordinator-side per-update halves, then the reducer, over ``(sender, update,
        weight)`` triples consumed one at a time: ``(reduced, count)``, ``None`` when fewer than
        the reducer's ``min_updates`` arrived.

        A linear reducer keeps only a running sum, so a round holds one update at a time.
        Coordinator-side halves run after the client-side ones, whatever their place in the
        list; each sees the ``ClientInfo`` of the update's sender.
        """
        fold: Fold | None = None
        for sender, update, weight in updates:
            update = self.coordinator(update, configs, ClientInfo(sender, round, seed))
            if fold is None:
                fold = self.fold(update)
            fold.add(update, weight)
        return fold.finish() if fold is not None else (None, 0)

    def aggregate(self, updates: Sequence[Params], weights: Sequence[float],
                  states: Sequence[StageState], configs: Sequence[Mapping[str, Any]],
                  info: RoundInfo, senders: Sequence[str] | None = None,
                  ) -> tuple[Params, list[StageState], dict[str, float]]:
        """:meth:`reduce` on lists, then :meth:`finish` (the server halves, reversed)."""
        names = senders if senders is not None else [f"update-{j}" for j in range(len(updates))]
        if len(updates) < self.reducer.min_updates:
            self.reducer._check(updates, weights)  # raises, naming what is missing
        reduced, _ = self.reduce(zip(names, updates, weights, strict=True), configs,
                                 info.round, info.seed)
        assert reduced is not None
        return self.finish(reduced, states, info)

    def finish(self, aggregate: Params, states: Sequence[StageState],
               info: RoundInfo) -> tuple[Params, list[StageState], dict[str, float]]:
        """The server halves on a reduced update, in reverse stage order."""
        new_states = list(states)
        metrics: dict[str, float] = {}
        for i in reversed(range(len(self.stages))):
            aggregate, new_states[i], m = self.stages[i].server(aggregate, new_states[i], info)
            metrics.update(m)
        return aggregate, new_states, metrics
