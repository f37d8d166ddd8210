"""Secure federated evaluation: clients evaluate the global model on their held-out data and
only the sums of the counts behind the metrics (examples, correct predictions, summed loss)
reach the coordinator, through secure aggregation (the seeds' second validation approach).

Unlike :class:`~shoal.callbacks.FederatedEvaluation`, no per-client figure exists at the
coordinator, so there is no worst-client or percentile metric: that is the point.
"""

from __future__ import annotations

from ..algorithm import RoundReport
from ..errors import ConfigError
from ..run import Callback, RunContext

__all__ = ["SecureFederatedEvaluation"]


class SecureFederatedEvaluation(Callback):
    """Every ``every`` rounds, evaluate the global params securely on the clients' held-out
    data (the algorithm must be a :class:`~shoal.secagg.SecureFedAvg`).

    Reports ``fed_eval/accuracy``, ``fed_eval/loss`` (weighted by examples),
    ``fed_eval/examples``, ``fed_eval/clients`` and ``fed_eval/secure = 1``.
    """

    def __init__(self, every: int = 1, *, clients: list[str] | None = None):
        if every < 1:
            raise ConfigError(f"SecureFederatedEvaluation: every must be >= 1 round "
                              f"(got {every}).")
        self.every = every
        self.clients = clients

    def after_round(self, ctx: RunContext, report: RoundReport) -> None:
        """Evaluate on multiples of ``every``."""
        if report.round % self.every == 0:
            report.metrics.update(self.evaluate(ctx))

    def evaluate(self, ctx: RunContext) -> dict[str, float]:
        """Run one secure federated evaluation of the current params now."""
        fn = getattr(ctx.algorithm, "evaluate_securely", None)
        if fn is None:
            raise ConfigError(f"SecureFederatedEvaluation needs a SecureFedAvg algorithm, got "
                              f"{type(ctx.algorithm).__name__}; use FederatedEvaluation instead.")
        return fn(ctx.params(), ctx.transport, ctx.round, self.clients)
