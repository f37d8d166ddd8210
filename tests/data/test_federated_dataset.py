"""FederatedDataset and federate(): clients as row numbers into one shared pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from shoal.data.arrays import ArrayData
from shoal.data.federated import ClientData, FederatedDataset, federate
from shoal.data.tasks import Task, load_task
from shoal.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def digits() -> Task:
    return load_task("digits")


def rows(data: ArrayData | None) -> set[int]:
    assert data is not None
    return set(data.index.tolist())


def toy_task(n: int = 30, groups: np.ndarray | None = None) -> Task:
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    y = torch.arange(n) % 3
    return Task(name="toy", model_fn=lambda: nn.Linear(2, 3), loss_fn=F.cross_entropy,
                train=ArrayData.of(x, y), test=ArrayData.of(x[:5], y[:5]), num_classes=3,
                groups=groups, default_partition={"partition": "iid", "num_clients": 3})


def test_clients_hold_disjoint_train_and_eval_rows_covering_the_pool(digits: Task) -> None:
    fd = federate(digits, partition="dirichlet", num_clients=20, alpha=0.5, seed=3)
    assert len(fd) == 20 and fd.client_ids() == [f"client-{k:02d}" for k in range(20)]
    seen: set[int] = set()
    for cid in fd.client_ids():
        c = fd.client(cid)
        assert isinstance(c, ClientData)
        train, held = rows(c.train), rows(c.eval)
        assert train and not train & held and not (train | held) & seen
        seen |= train | held
        assert fd.num_examples(cid) == len(c.train)
        # About 20 % held out, rounded, per client.
        n = len(train) + len(held)
        assert len(held) == min(int(np.floor(0.2 * n + 0.5)), n - 1)
    assert seen == set(digits.train.index.tolist())
    assert set(fd.pooled_train().index.tolist()) == seen - {
        r for cid in fd.client_ids() for r in rows(fd.client(cid).eval)}
    assert fd.test is digits.test


def test_clients_are_views_over_the_shared_pool(digits: Task) -> None:
    fd = federate(digits, num_clients=10)
    c = fd.client("client-3")
    assert c.train.x is fd.x is digits.train.x  # no copy of x per client
    assert c.eval is not None and c.eval.y is fd.y
    xb, yb = next(c.train.batches(4))
    assert xb.shape == (4, 64) and yb.dtype == torch.int64


def test_same_seed_same_federation_other_seed_different(digits: Task) -> None:
    a, b, c = (federate(digits, seed=s) for s in (5, 5, 6))
    for cid in a.client_ids():
        assert torch.equal(a.client(cid).train.index, b.client(cid).train.index)
        assert torch.equal(a.client(cid).eval.index, b.client(cid).eval.index)  # type: ignore[union-attr]
    assert any(not torch.equal(a.client(k).train.index, c.client(k).train.index)
               for k in a.client_ids())


def test_defaults_come_from_the_task(digits: Task) -> None:
    fd = federate(digits)
    assert fd.info["partition"] == "dirichlet" and fd.info["alpha"] == 0.5 and len(fd) == 20
    other = federate(digits, partition="iid")
    assert len(other) == 20 and "alpha" not in other.info  # the default's alpha does not apply
    assert len(federate(digits, num_clients=7, alpha=0.1)) == 7


def test_eval_fraction_zero_gives_no_eval_sets(digits: Task) -> None:
    fd = federate(digits, num_clients=5, eval_fraction=0.0)
    assert all(fd.client(k).eval is None for k in fd.client_ids())
    assert len(fd.pooled_train()) == len(digits.train)


def test_tiny_clients_keep_a_training_example_and_may_have_no_eval() -> None:
    task = toy_task(6, groups=np.array(["a", "b", "b", "c", "c", "c"]))
    fd = federate(task, partition="natural", eval_fraction=0.5)
    assert fd.client_ids() == ["a", "b", "c"]
    assert [(len(fd.client(k).train), len(fd.client(k).eval)) for k in "abc"] == [  # type: ignore[arg-type]
        (1, 0), (1, 1), (1, 2)]


def test_unknown_client_id_lists_known_ids(digits: Task) -> None:
    fd = federate(digits, num_clients=12)
    with pytest.raises(DataError) as info:
        fd.client("client-99")
    assert str(info.value) == ("FederatedDataset: unknown client id 'client-99'; expected one "
                               "of the 12 ids ('client-00', 'client-01', 'client-02', ...); "
                               "see client_ids().")


def test_natural_partition_needs_groups(digits: Task) -> None:
    with pytest.raises(ConfigError) as info:
        federate(digits, partition="natural")
    assert str(info.value) == (
        "federate: task 'digits' has no natural client ids (Task.groups is None); tasks that "
        "have them: ai4i, cmapss, gtsrb, heart. Use partition='dirichlet', 'iid', 'shards' or 'quantity'.")


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_eval_fraction_out_of_range(digits: Task, fraction: float) -> None:
    with pytest.raises(ConfigError) as info:
        federate(digits, eval_fraction=fraction)
    assert str(info.value) == (f"federate: eval_fraction must be in [0, 1) (got {fraction}); "
                               "0 disables federated evaluation.")


def test_describe_summarises_sizes_and_label_skew(digits: Task) -> None:
    skewed = federate(digits, alpha=0.1).describe()
    flat = federate(digits, alpha=100.0).describe()
    assert skewed["clients"] == 20 and skewed["test_examples"] == len(digits.test)
    assert skewed["train_examples"]["total"] + skewed["eval_examples"] == len(digits.train)
    assert skewed["train_examples"]["min"] <= skewed["train_examples"]["median"]
    assert skewed["label_skew"] > flat["label_skew"] + 0.3
    assert skewed["classes_per_client"]["median"] < flat["classes_per_client"]["median"]


def test_constructor_checks_rows() -> None:
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(DataError) as info:
        FederatedDataset(x, y, {"a": (torch.tensor([0, 4]), None)})
    assert str(info.value) == ("FederatedDataset: client 'a' train rows has rows outside the "
                               "pool of 4 examples (got min 0, max 4).")
    with pytest.raises(DataError, match="no clients; expected at least one"):
        FederatedDataset(x, y, {})
    fd = FederatedDataset(x, y, {"b": (torch.tensor([1]), None), "a": (torch.tensor([0]), None)})
    assert fd.client_ids() == ["a", "b"] and "2 clients" in repr(fd)


def test_regression_targets_partition_without_labels() -> None:
    task = toy_task(20)
    task.train = ArrayData.of(task.train.x, task.train.x[:, 0])  # float targets
    fd = federate(task, partition="dirichlet", num_clients=4, alpha=0.1)
    assert sum(fd.num_examples(k) + len(fd.client(k).eval) for k in fd.client_ids()) == 20  # type: ignore[arg-type]
    assert "label_skew" not in fd.describe()


# -- units of near-copies ----------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=12, max_size=120), st.integers(0, 10**6),
       st.sampled_from(["iid", "dirichlet", "shards", "quantity", "natural"]),
       st.sampled_from([0.0, 0.2, 0.5]))
def test_a_unit_of_near_copies_is_never_split(units: list[int], seed: int, method: str,
                                              eval_fraction: float) -> None:
    """Whatever the partition, every unit's rows go to one client, and to one side of its
    train / held-out split; every row of the pool is dealt out once."""
    u = np.array(units)
    n = len(u)
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    y = torch.from_numpy(u % 3)  # a unit holds one class (a track of one sign)
    k = min(3, len(set(units)))
    groups = np.array([f"site-{t % k}" for t in units])  # natural: whole units per site
    task = Task(name="tracks", model_fn=lambda: nn.Linear(2, 3), loss_fn=F.cross_entropy,
                train=ArrayData.of(x, y), test=ArrayData.of(x[:5], y[:5]), num_classes=3,
                groups=groups, units=u)
    options = ({"shards_per_client": 1} if method == "shards" else
               {"min_size": 1} if method in ("dirichlet", "quantity") else {})
    if method == "shards" and len(set(units)) < k:
        return
    fd = federate(task, partition=method, num_clients=None if method == "natural" else k,
                  seed=seed, eval_fraction=eval_fraction, **options)
    owner: dict[int, tuple[str, str]] = {}
    dealt = []
    for cid in fd.client_ids():
        c = fd.client(cid)
        for side, data in (("train", c.train), ("eval", c.eval)):
            idx = [] if data is None else data.index.tolist()
            dealt += idx
            for row in idx:
                where = owner.setdefault(int(u[row]), (cid, side))
                assert where == (cid, side), f"unit {u[row]} split: {where} and {(cid, side)}"
    assert sorted(dealt) == list(range(n))


def test_without_units_the_federation_is_unchanged() -> None:
    """A task without units is dealt out row by row as before units existed (these rows were
    printed by the code before that change, from the same seed)."""
    fd = federate(toy_task(), partition="dirichlet", num_clients=3, seed=5)
    assert [sorted(rows(fd.client(c).train)) for c in fd.client_ids()] == [
        [6, 8, 9, 11, 15, 20, 24, 29], [4, 5, 7, 14, 22, 23, 25, 26],
        [0, 1, 3, 10, 13, 16, 19, 27]]
    assert [sorted(rows(fd.client(c).eval)) for c in fd.client_ids()] == [
        [2, 21], [17, 28], [12, 18]]
