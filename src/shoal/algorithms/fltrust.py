"""``FLTrust``: FedAvg whose coordinator bootstraps trust from a small root data set.

Cao et al. 2021 ("FLTrust: Byzantine-robust federated learning via trust bootstrapping"): the
coordinator holds a small clean data set (the *root*), and each round trains the clients'
own update rule on it from the global model. That reference update scores every client's:
trust ``ReLU(cos(update, reference))``, each update rescaled to the reference's norm, the
trust-weighted mean applied (:class:`~shoal.aggregate.TrustedMean`). An update pointing away
from the reference gets no weight whatever its size, so sign flippers and boosted backdoors
are cut off; the round's trust scores are its per-client anomaly scores (``fltrust/untrusted``
counts the clients with none, ``fltrust/trust_min`` and ``fltrust/trust_mean`` summarise).

The conversation is FedAvg's; only the reducer changes each round (it needs the round's
reference), so FLTrust is FedAvg with another :meth:`round_fold`. The coordinator must be
able to train (it holds a model and the root data): a real deployment's trust assumption.
"""

from __future__ import annotations

from typing import Any

from ..aggregate import Pipeline, TrustedMean
from ..algorithm import RoundReport
from ..data.arrays import ArrayData
from ..errors import ConfigError
from ..seeding import derive_seed
from ..transport import Transport
from ..types import ClientInfo
from .collect import RoundFold
from .fedavg import FedAvg, FedAvgState

__all__ = ["FLTrust"]


class FLTrust(FedAvg):
    """FedAvg with FLTrust's aggregation; ``root``: the coordinator's clean examples (the
    paper uses about 100). Other arguments as :class:`~shoal.algorithms.fedavg.FedAvg`; its
    pipeline's reducer is replaced each round (stages are kept)."""

    def __init__(self, client_update: Any, root: ArrayData, **kwargs: Any):
        super().__init__(client_update, **kwargs)
        if len(root) == 0:
            raise ConfigError("FLTrust: the root data set is empty; give the coordinator a "
                              "few clean examples (the paper uses 100).")
        self.root = root
        self._trusted: TrustedMean | None = None

    def __repr__(self) -> str:
        return f"FLTrust({self.client_update!r}, root={len(self.root)} examples)"

    def reference(self, state: FedAvgState, round: int) -> Any:
        """The coordinator's own update of ``round`` on the root data."""
        info = ClientInfo("coordinator", round, derive_seed(self.seed, "fltrust-root", round),
                          {})
        return self.client_update(state.params, self.root, info).update

    def round_fold(self, state: FedAvgState, configs: list[dict], round: int) -> RoundFold:
        """FedAvg's fold with this round's trusted mean."""
        self._trusted = TrustedMean(self.reference(state, round))
        return RoundFold(Pipeline(self.pipeline.stages, self._trusted), state.params, configs,
                         round, self.seed, weight_cap=self.weight_cap)

    def round(self, state: FedAvgState, transport: Transport,
              round: int) -> tuple[FedAvgState, RoundReport]:
        """FedAvg's round, with the trust scores in the metrics."""
        state, report = super().round(state, transport, round)
        trust = self._trusted.last_trust if self._trusted is not None else []
        if trust:
            report.metrics["fltrust/untrusted"] = float(sum(1 for t in trust if t == 0.0))
            report.metrics["fltrust/trust_min"] = min(trust)
            report.metrics["fltrust/trust_mean"] = sum(trust) / len(trust)
        return state, report
