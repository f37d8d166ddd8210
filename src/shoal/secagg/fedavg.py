"""``SecureFedAvg``: FedAvg whose coordinator learns only the sum of the updates.

The same cohort sampling, client update, client-side stages, server-side stage halves and
server optimizer as :class:`~shoal.algorithms.fedavg.FedAvg`; only the conversation differs: a
round is one SecAgg+ session (:mod:`shoal.secagg.protocol`) in place of ``"train"``. Each client
trains, runs the pipeline's client-side stages, checks its update, clips it per coordinate and
sends the masked quantization of the vector::

    [w * x (one value per parameter), w, w * train_loss, w * has_loss, train_examples,
     loss_clipped, weight_capped]

with ``w = min(weight, max_weight) / max_weight``. The coordinator unmasks the sums and gets
the weighted mean ``sum(w x) / sum(w)`` (the reducer's ``finalize``), then runs the pipeline's
server halves on it — where coordinator-side stages such as central DP noise operate on the
securely aggregated sum — and the server optimizer. Training metrics are aggregated securely
too.

A pipeline stage that ``encodes_to_ring`` (distributed DP,
:class:`~shoal.privacy.distributed.DistributedDP`) replaces that vector: each client sends only
its update, encoded by the stage into integers modulo 2^32 (clipped, rounded and noised on the
client), the stage decodes the secure sum, and the mean is the noisy sum over the number of
contributors (the uniform mean; training loss and example counts are not sent, as their sums
would be released without noise). Clients also answer secure federated evaluation (task
``"evaluate"``): the sums behind the pooled metrics (examples, and examples times each mean
metric of the task's kind: loss, accuracy, or MSE and MAE) are summed securely, each client's
value clipped to a public bound (the clipped clients are counted too).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch

from .. import tree
from ..aggregate import Fold, Pipeline, ServerOpt, WeightedMean
from ..algorithm import RoundReport
from ..algorithms.cohort import Cohort
from ..algorithms.fedavg import ClientEvaluate, FedAvg, FedAvgState, eval_data, train_data
from ..algorithms.influence import EXAMPLES_FACTOR
from ..client import ClientUpdate
from ..errors import AggregationError, UpdateError
from ..message import Message
from ..metrics import KIND_METRICS, MEAN_METRICS, pooled_derived
from ..node import Handler, NodeContext
from ..transport import Transport
from ..tree import Params
from ..types import ClientInfo, RoundInfo
from .errors import SecAggError
from .protocol import SecAggClient
from .quantize import Block, dequantize, error_bound
from .session import SecureSum, secure_sum
from .stage import SecureAggregation

__all__ = ["EXAMPLES_FACTOR", "LOSS_CLIP", "RingEncoding", "SecureFedAvg"]

log = logging.getLogger(__name__)

LOSS_CLIP = 100.0
"""Losses are clipped to [0, LOSS_CLIP] before they are summed securely (the clients whose loss
was over it are counted: ``train/loss_clipped``, ``fed_eval/clipped``)."""



class RingEncoding(Protocol):
    """What a stage that ``encodes_to_ring`` offers :class:`SecureFedAvg` (distributed DP,
    :class:`~shoal.privacy.distributed.DistributedDP`)."""

    min_clients: int
    """The fewest contributors a released sum may have."""

    def generator(self, seed: int, round: int, client: str) -> Any:
        """The randomness of one client's encoding in one round."""
        ...

    def encode(self, update: np.ndarray, gen: Any) -> np.ndarray:
        """One client's update (float64) as ``uint32`` values of the ring."""
        ...

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float64 sum from the ring sum of the encoded updates."""
        ...


class SecureFedAvg(FedAvg):
    """FedAvg over secure aggregation; arguments as :class:`FedAvg`, plus ``secagg``.

    ``secagg`` is the :class:`SecureAggregation` stage (default settings if ``None``); it is
    appended to the pipeline unless the pipeline already holds one, so the pipeline's secrecy
    check rejects, at construction, reducers that need individual updates.
    """

    def __init__(self, client_update: ClientUpdate, *, secagg: SecureAggregation | None = None,
                 pipeline: Pipeline | None = None, server_opt: ServerOpt | None = None,
                 cohort: Cohort | None = None, min_replies: int = 1,
                 timeout: float | None = None, client_eval: ClientEvaluate | None = None,
                 seed: int = 0):
        base = pipeline if pipeline is not None else Pipeline()
        present = [s for s in base.stages if isinstance(s, SecureAggregation)]
        if present:
            secagg = present[0]
        else:
            secagg = secagg if secagg is not None else SecureAggregation()
            base = Pipeline([*base.stages, secagg], base.reducer)
        if not isinstance(base.reducer, WeightedMean):
            raise AggregationError(
                f"SecureFedAvg: {base.reducer!r} is not a weighted mean; secure aggregation "
                "reveals only sums, so use weighted_mean()."
            )
        super().__init__(client_update, pipeline=base, server_opt=server_opt, cohort=cohort,
                         min_replies=min_replies, timeout=timeout, client_eval=client_eval,
                         seed=seed)
        self.secagg = secagg
        self.ring = cast(RingEncoding | None, next(
            (st for st in base.stages if getattr(st, "encodes_to_ring", False)), None))
        """The stage that encodes updates into the ring itself (distributed DP), or None."""
        if self.ring is not None and min_replies < self.ring.min_clients:
            raise AggregationError(
                f"SecureFedAvg: min_replies = {min_replies} is below the {self.ring.min_clients} "
                f"contributors whose noise {self.ring!r} needs in every released sum; set "
                f"min_replies >= {self.ring.min_clients}.")
        self._imprecise: set[str] = set()  # the means whose imprecision was logged
        self.protocol = SecAggClient({"train": self.train_input,
                                      "evaluate": self.evaluate_input}, seed,
                                     min_survivors=self.ring.min_clients if self.ring else 1)

    def __repr__(self) -> str:
        return (f"SecureFedAvg({self.client_update!r}, {self.pipeline!r}, {self.server_opt!r}, "
                f"{self.cohort!r}, min_replies={self.min_replies})")

    def _max_weight(self) -> float:
        reducer = self.pipeline.reducer
        assert isinstance(reducer, WeightedMean)
        return 1.0 if reducer.weighting == "uniform" else self.secagg.max_weight

    def _max_examples(self) -> float:
        return EXAMPLES_FACTOR * self.secagg.max_weight

    def _sum(self, transport: Transport, clients: Sequence[str], round: int, session: str,
             task: str, length: int, payload: Params, config: dict) -> SecureSum:
        s = self.secagg
        return secure_sum(transport, clients, round=round, session=session, task=task,
                          length=length, payload=payload,
                          config={**config, **self._public(task)},
                          neighbours=s.neighbours, threshold=s.threshold, seed=self.seed,
                          timeout=self.timeout, min_contributors=self.min_replies)

    # -- coordinator side -------------------------------------------------------------------

    def round(self, state: FedAvgState, transport: Transport,
              round: int) -> tuple[FedAvgState, RoundReport]:
        """One round of FedAvg in which the coordinator sees only the secure sum."""
        population = transport.nodes()
        chosen = self.cohort.sample(population, self.seed, round)
        configs = self.pipeline.client_configs(state.stage_states)
        template = self.pipeline.update_template(state.params)  # stages may add tensors
        n = tree.numel(template)
        res = self._sum(transport, chosen, round, f"train-{round}", "train",
                        n if self.ring is not None else n + 6, state.params, {"stages": configs})
        report = RoundReport(round, dropped=dict(res.dropped))
        for c, why in res.dropped.items():
            log.warning("round %d: dropped %s: %s", round, c, why)
        m = report.metrics
        m["round/sampled"] = float(len(chosen))
        m["round/replied"] = float(len(res.contributors))
        m["round/dropped"] = float(len(res.dropped))
        m["secagg/neighbours"] = float(res.neighbours)
        m["secagg/threshold"] = float(res.threshold)
        m.update({f"secagg/{k}": v for k, v in res.timings.items()})
        if res.failed is not None or res.total is None:
            report.failed = res.failed
            log.warning("round %d not applied: %s", round, report.failed)
            return state, report
        if self.ring is not None:
            wx, total_weight = self.ring.decode(res.total), float(len(res.contributors))
        else:
            wx, total_weight = self._training_sums(res, n, m)
        if not total_weight > 0:
            report.failed = (f"the securely summed weight is {total_weight:g}; expected > 0 "
                             "(raise secagg.max_weight if clients are small)")
            return state, report
        # The unmasked sum is folded like any round's replies, then finished and applied as
        # FedAvg does (the division by the total weight in float64, then the params' dtypes).
        _, spec = tree.flatten(template)
        weighted = tree.unflatten(torch.from_numpy(wx), [(k, s, torch.float64)
                                                         for k, s, _ in spec])
        fold = Fold(self.pipeline.reducer, weighted)
        fold.add_sum(weighted, total_weight, len(res.contributors))
        mean, _ = fold.finish()
        assert mean is not None
        reduced = {k: mean[k].to(dtype) for k, _, dtype in spec}
        info = RoundInfo(round, self.seed, len(chosen), len(res.contributors), len(population))
        return self.apply(state, reduced, info, report)

    def _training_sums(self, res: SecureSum, n: int,
                       metrics: dict[str, float]) -> tuple[np.ndarray, float]:
        """The weighted update sum and the total weight from the secure sum of the training
        vector (see the module docstring); the training metrics into ``metrics``."""
        assert res.total is not None
        clip, big = self.secagg.clip, self._max_examples()
        wx, w, wloss, wcount, examples, over, capped = dequantize(
            res.total, [(n, clip), (1, 1.0), (1, LOSS_CLIP), (1, 1.0), (1, big), (1, 1.0),
                        (1, 1.0)], res.levels)
        metrics["train/examples"] = float(_nearest(examples[0]))  # a sum of integer counts
        metrics["train/loss_clipped"] = float(_nearest(over[0]))
        metrics["round/weights_capped"] = float(_nearest(capped[0]))
        if metrics["train/loss_clipped"]:
            log.warning("%d client(s) had a training loss over %g, summed as %g: train/loss "
                        "is an underestimate", metrics["train/loss_clipped"], LOSS_CLIP,
                        LOSS_CLIP)
        if wcount[0] > 0:
            metrics["train/loss"] = float(wloss[0] / wcount[0])
        return wx, float(w[0])

    def _public(self, task: str) -> dict[str, Any]:
        """The public parameters of a ``task`` session ("train" or "evaluate"), as this
        node's own config gives them: the coordinator sends its values, and a client sums only
        under its own (:meth:`_check_agreed`)."""
        out: dict[str, Any] = {"clip": self.secagg.clip, "max_weight": self._max_weight(),
                               "max_examples": self._max_examples()}
        if task == "evaluate":
            out["means"] = [list(m) for m in self._eval_means()]
        return out

    def _check_agreed(self, message: Message, task: str) -> None:
        """Refuse a session whose public parameters (bounds, the means to sum) differ from
        this client's own config. A coordinator that chose them could learn one client's
        figure from several sums (one metric under rising bounds puts a kink in the sums at
        each client's value); under the client's own, it learns the sums only."""
        for name, mine in self._public(task).items():
            theirs = message.config.get(name)
            if theirs != mine:
                raise SecAggError(
                    f"{task}: the coordinator asked to sum with {name} = {theirs!r}, but this "
                    f"client's config gives {mine!r}; a client sums only under the public "
                    "bounds of its own job config ([secagg], the task), which the coordinator "
                    "must share: refused.")

    def _eval_kind(self) -> str:
        """The task kind the client evaluation computes (an evaluation function without a
        ``kind`` is taken as classification)."""
        return str(getattr(self.client_eval, "kind", "classification"))

    def _eval_means(self) -> list[tuple[str, float]]:
        """The example means that secure federated evaluation sums, each with the public
        bound on one client's value: ``loss``, then the task kind's
        :data:`~shoal.metrics.MEAN_METRICS`."""
        bounds = {"accuracy": 1.0, "mse": self.secagg.max_mse,
                  "mae": math.sqrt(self.secagg.max_mse)}
        return [("loss", LOSS_CLIP), *((m, bounds[m]) for m in MEAN_METRICS[self._eval_kind()])]

    def evaluate_securely(self, params: Params, transport: Transport, round: int,
                          clients: list[str] | None = None) -> dict[str, float]:
        """Secure federated evaluation of ``params``: the pooled means of the task's metrics
        (:meth:`_eval_means`, and what derives from them: RMSE, perplexity) from securely
        summed ``examples x mean`` per client; ``fed_eval/clipped`` counts the clients whose
        value (or number of held-out examples, bounded by ``max_weight``) was over its public
        bound and counted as the bound."""
        targets = clients if clients is not None else transport.nodes()
        means = self._eval_means()
        res = self._sum(transport, targets, round, f"evaluate-{round}", "evaluate",
                        len(means) + 3, params, {})
        out = {"fed_eval/secure": 1.0}
        if res.failed is not None or res.total is None:
            log.warning("round %d: secure federated evaluation failed: %s", round, res.failed)
            out["fed_eval/clients"] = 0.0
            return out
        cap = self.secagg.max_weight
        examples, counted, clipped, *sums = dequantize(
            res.total, [(1, cap), (1, 1.0), (1, 1.0), *((1, cap * b) for _, b in means)],
            res.levels)
        out["fed_eval/clients"] = float(_nearest(counted[0]))
        out["fed_eval/examples"] = float(_nearest(examples[0]))
        out["fed_eval/clipped"] = float(_nearest(clipped[0]))
        if out["fed_eval/clipped"]:
            log.warning("round %d: secure federated evaluation: %d client(s) had a metric over "
                        "its public bound and counted with the bound (loss %g; MSE "
                        "secagg.max_mse)", round, out["fed_eval/clipped"], LOSS_CLIP)
        if examples[0] > 0:
            pooled = {name: max(float(s[0] / examples[0]), 0.0)
                      for (name, _), s in zip(means, sums, strict=True)}
            for name, b in means:  # how precise the secure sum can be, against the value
                err = error_bound(len(res.contributors), cap * b, res.levels) / examples[0]
                if err > 0.1 * pooled[name] and name not in self._imprecise:
                    self._imprecise.add(name)
                    log.warning(
                        "round %d: secure federated evaluation: fed_eval/%s = %.4g is within "
                        "its quantization error (up to %.2g): the public bound of one client's "
                        "value (%g x max_weight %g) is far above it%s", round, name,
                        pooled[name], err, b, cap,
                        "; set secagg.max_mse nearer the largest MSE a client can have"
                        if name in ("mse", "mae") else "")
            pooled.update(pooled_derived(pooled, KIND_METRICS[self._eval_kind()]))
            out.update({f"fed_eval/{k}": v for k, v in pooled.items()})
        return out

    # -- client side ------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The four ``secagg.*`` kinds only: a secure client never answers plain ``"train"``
        or ``"evaluate"``, which would reveal its update or metrics."""
        return self.protocol.handlers()

    def train_input(self, message: Message, context: NodeContext) -> list[Block]:
        """Train, run the client-side stages, check the update; the blocks to sum securely."""
        info = ClientInfo(context.node_id, message.round,
                          self.client_seed(message.round, context.node_id), message.config)
        result = self.client_update(message.tensors, train_data(context), info)
        update = self.pipeline.client(result.update, message.config.get("stages", []), info)
        template = self.pipeline.update_template(message.tensors)
        tree.check_update(template, update)
        if self.ring is not None:  # distributed DP: the update only, noised on this client
            flat, _ = tree.flatten({k: update[k] for k in template})
            gen = self.ring.generator(self.seed, message.round, context.node_id)
            return [(self.ring.encode(flat.detach().to(torch.float64).numpy(), gen), None)]
        weight = self.pipeline.reducer.client_weight(float(result.weight))
        if not (math.isfinite(weight) and weight > 0):
            raise UpdateError(f"client {context.node_id!r}: weight must be a finite number > 0, "
                              f"got {weight!r}.")
        self._check_agreed(message, "train")
        clip, cap = self.secagg.clip, self._max_weight()
        w = min(weight, cap) / cap
        flat, _ = tree.flatten({k: update[k] for k in template})
        x = flat.detach().to(torch.float64).numpy()
        np.clip(x, -clip, clip, out=x)
        x *= w  # |w x| <= clip since w <= 1
        loss = result.metrics.get("train/loss")
        has = loss is not None and math.isfinite(loss)
        clipped = min(max(loss, 0.0), LOSS_CLIP) if loss is not None and has else 0.0
        over = loss is not None and has and loss > LOSS_CLIP
        examples = result.metrics.get("train/examples", float(result.weight))
        return [(x, clip), (np.array([w]), 1.0), (np.array([w * clipped]), LOSS_CLIP),
                (np.array([w if has else 0.0]), 1.0),
                (np.array([examples]), self._max_examples()),
                (np.array([1.0 if over else 0.0]), 1.0),
                (np.array([1.0 if weight > cap else 0.0]), 1.0)]

    def evaluate_input(self, message: Message, context: NodeContext) -> list[Block]:
        """Evaluate the params sent on the node's held-out data; the counts to sum securely."""
        if self.client_eval is None:
            raise SecAggError("this federation has no client evaluation function; pass "
                              "client_eval to SecureFedAvg.")
        self._check_agreed(message, "evaluate")
        means = self._eval_means()
        data = eval_data(context)
        m = self.client_eval(message.tensors, data) if data is not None and len(data) else {}
        cap = self.secagg.max_weight
        held = float(m.get("examples", 0.0))
        ex = min(held, cap)  # more held-out examples than max_weight count as max_weight
        blocks: list[Block] = [(np.array([ex]), cap), (np.array([1.0 if ex > 0 else 0.0]), 1.0)]
        values, clipped = [], held > cap
        for name, bound in means:
            if ex > 0 and name not in m:
                raise SecAggError(f"evaluate: this client's evaluation reports "
                                  f"{sorted(m)}, without the mean {name!r} of its task's kind; "
                                  "pass an evaluation function of the task (Evaluator).")
            v = float(m.get(name, 0.0)) if ex > 0 else 0.0
            if not math.isfinite(v) or v > bound:
                v, clipped = float(bound), True
            values.append((np.array([ex * max(v, 0.0)]), cap * bound))
        return [*blocks, (np.array([1.0 if clipped else 0.0]), 1.0), *values]


def _nearest(x: float) -> int:
    """``x`` rounded to the nearest integer (a securely summed count)."""
    return int(math.floor(x + 0.5))
