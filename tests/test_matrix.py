"""Every executor x pipeline x secure aggregation that is allowed gives the sequential
executor's global model — bit for bit where the arithmetic is the same (sequential, secure
sums of integers), within float32 rounding where sums are added in another order (batched
steps, per-rank partial sums) — and every one that is not allowed is a ConfigError at
construction. Includes the regression of the processes executor with DP-FedAvg's adaptive
clipping (the extra tensor its stage adds to each update)."""

from __future__ import annotations

import pytest

from shoal import tree
from shoal.aggregate import Pipeline, clip_by_norm, trimmed_mean, weighted_mean
from shoal.algorithms.cohort import Cohort
from shoal.algorithms.fedavg import FedAvg
from shoal.client import local_sgd
from shoal.errors import ConfigError
from shoal.privacy import dp_fedavg
from shoal.run import run
from shoal.secagg import SecureFedAvg, secure_aggregation
from shoal.sim import InProcessTransport
from shoal.sim.processes import ProcessesExecutor

from .conftest import cross_entropy, sgd
from .test_executors import assert_close, tiny_model, unequal_federation

PIPELINES = {
    "none": lambda: Pipeline(),
    "clipping": lambda: Pipeline([clip_by_norm(0.5)]),
    "dp_fixed": lambda: Pipeline([dp_fedavg(0.3, 0.5, Cohort(), reproducible=True)],
                                 weighted_mean("uniform")),
    "dp_adaptive": lambda: Pipeline([dp_fedavg(0.3, 0.5, Cohort(), adaptive=True,
                                               count_stddev=1.0, reproducible=True)],
                                    weighted_mean("uniform")),
    "trimmed_mean": lambda: Pipeline([], trimmed_mean(0.2)),
}
EXECUTORS = ("sequential", "vectorized", "processes")


def build(pipeline: str, secagg: bool):
    update = local_sgd(tiny_model(), cross_entropy, batch_size=4, optimizer=sgd(0.1))
    if secagg:
        return SecureFedAvg(update, pipeline=PIPELINES[pipeline](), seed=5,
                            secagg=secure_aggregation(clip=5.0, max_weight=30.0))
    return FedAvg(update, pipeline=PIPELINES[pipeline](), seed=5)


def train(pipeline: str, secagg: bool, executor: str):
    algorithm = build(pipeline, secagg)
    data, ids = unequal_federation()
    run_executor = ProcessesExecutor(2, inner="vectorized") if executor == "processes" \
        else executor
    with InProcessTransport(ids, data.__getitem__, algorithm.handlers(),
                            executor=run_executor) as transport:
        res = run(algorithm, transport, rounds=2, params=tree.params_of(tiny_model()))
    assert all(not h.get("round/failed") for h in res.history), res.history
    return res


_reference: dict[tuple[str, bool], object] = {}


def reference(pipeline: str, secagg: bool):
    key = (pipeline, secagg)
    if key not in _reference:
        _reference[key] = train(pipeline, secagg, "sequential")
    return _reference[key]


ALLOWED = [(p, s) for p in PIPELINES for s in (False, True) if not (s and p == "trimmed_mean")]


@pytest.mark.parametrize("executor", EXECUTORS[1:])
@pytest.mark.parametrize(("pipeline", "secagg"), ALLOWED,
                         ids=[f"{p}-{'secagg' if s else 'plain'}" for p, s in ALLOWED])
def test_every_allowed_combination_gives_the_sequential_model(pipeline, secagg, executor):
    want = reference(pipeline, secagg)
    got = train(pipeline, secagg, executor)
    if secagg:  # exact integer sums of the same clients' updates: bit for bit
        assert tree.equal(want.state.params, got.state.params)
    else:
        assert_close(want.state.params, got.state.params)
    for a, b in zip(want.history, got.history, strict=True):
        assert a["round/replied"] == b["round/replied"] == 6
        assert a["comm/bytes_down"] == b["comm/bytes_down"]
        # Replies carry their loss as JSON text: its digits follow the float's last bits.
        assert a["comm/bytes_up"] == pytest.approx(b["comm/bytes_up"], abs=6 * 4)


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_the_sequential_executor_is_the_plain_transport_bit_for_bit(pipeline):
    want = reference(pipeline, False)
    algorithm = build(pipeline, False)
    data, ids = unequal_federation()
    transport = InProcessTransport(ids, data.__getitem__, algorithm.handlers())
    res = run(algorithm, transport, rounds=2, params=tree.params_of(tiny_model()))
    assert tree.equal(want.state.params, res.state.params)


def test_secure_aggregation_with_a_robust_reducer_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^trimmed_mean\(0.2\) needs individual updates, but "
                                          r"secure_aggregation\(.*\) reveals only their sum; use "
                                          r"weighted_mean\(\)\.$"):
        build("trimmed_mean", True)


def test_a_rank_that_trains_no_client_adds_zeros_of_the_whole_template():
    """One client per round on two ranks: rank 1 folds nothing, and its part still has the
    round's template — params plus DP-FedAvg's adaptive-clipping bit — for the reduction."""
    def one_client(executor):
        update = local_sgd(tiny_model(), cross_entropy, batch_size=4, optimizer=sgd(0.1))
        algorithm = FedAvg(update, cohort=Cohort(1), seed=5, pipeline=Pipeline(
            [dp_fedavg(0.3, 0.5, Cohort(1), adaptive=True, count_stddev=1.0,
                       reproducible=True)],
            weighted_mean("uniform")))
        data, ids = unequal_federation()
        with InProcessTransport(ids, data.__getitem__, algorithm.handlers(),
                                executor=executor) as transport:
            return run(algorithm, transport, rounds=2, params=tree.params_of(tiny_model()))

    want, got = one_client("sequential"), one_client(ProcessesExecutor(2))
    assert [h["round/replied"] for h in got.history] == [1.0, 1.0]
    assert tree.equal(want.state.params, got.state.params)  # 0 + x = x: bit for bit
