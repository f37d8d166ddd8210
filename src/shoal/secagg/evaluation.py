"""Secure federated evaluation: clients evaluate the global model on their held-out data and
only the sums behind the pooled metrics (examples, and examples times each mean metric of the
task's kind: loss, accuracy, or MSE and MAE) reach the coordinator, through secure aggregation
(the seeds' second validation approach).

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

    Reports the pooled ``fed_eval/loss`` and the task kind's means (``fed_eval/accuracy``; for
    regression ``fed_eval/mse``, ``fed_eval/mae`` and ``fed_eval/rmse``; for sequences
    ``fed_eval/perplexity`` too), ``fed_eval/examples``, ``fed_eval/clients``,
    ``fed_eval/clipped`` (clients whose value was over its public bound) and
    ``fed_eval/secure = 1``. F1, AUC and the user's own metrics do not pool from sums and are
    not reported.
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
