"""A population of a million clients on one machine: compact ids and row ranges, partitions
without a Python object per client, rounds and checkpoints that do not grow with it."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shoal import tree
from shoal.algorithms.cohort import Cohort
from shoal.algorithms.fedavg import FedAvg
from shoal.checkpoint import Checkpoint, latest_checkpoint
from shoal.client import local_sgd
from shoal.data.federated import FederatedDataset, Ranges
from shoal.data.ids import ClientIds
from shoal.data.partition import client_names, packed_partition, partition
from shoal.run import run
from shoal.sim import InProcessTransport


def test_client_ids_are_computed_not_stored():
    ids = ClientIds(1_000_000)
    assert ids[0] == "client-000000" and ids[-1] == "client-999999" and len(ids) == 1_000_000
    assert "client-000042" in ids and "client-42" not in ids and "client-1000000" not in ids
    assert ids.index("client-123456") == 123456
    assert ClientIds(20) == client_names(20) and list(ClientIds(3)) == ["client-0", "client-1",
                                                                         "client-2"]
    with pytest.raises(ValueError):
        ids.index("someone")


@pytest.mark.parametrize("method, options", [("iid", {}), ("quantity", {"alpha": 0.3})])
def test_packed_partitions_equal_the_per_client_ones(method, options):
    y = np.random.default_rng(0).integers(0, 5, 997)
    parts = partition(method, y, 23, np.random.default_rng(7), **options)
    ids, rows, lengths = packed_partition(method, y, 23, np.random.default_rng(7), **options)
    assert isinstance(ids, ClientIds) and list(ids) == sorted(parts)
    got = np.split(rows, np.cumsum(lengths)[:-1])
    for cid, r in zip(ids, got, strict=True):
        assert np.array_equal(parts[cid], r)


def test_a_million_clients_train_and_checkpoint_like_a_thousand(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3000, 8, generator=g), torch.randint(0, 3, (3000,), generator=g)
    sizes = {}
    for n in (1_000, 1_000_000):
        fd = FederatedDataset.sampled(x, y, n, 20, seed=0)
        assert isinstance(fd.client_ids(), ClientIds) and len(fd) == n
        assert fd._train.starts.nbytes + fd._train.lengths.nbytes == 16 * n  # 2 int64 each
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 3))
        algo = FedAvg(local_sgd(model, F.cross_entropy, batch_size=10,
                                optimizer=functools.partial(torch.optim.SGD, lr=0.1)),
                      cohort=Cohort(100), seed=0)
        with InProcessTransport(fd.client_ids(), fd.client, algo.handlers(),
                                executor="vectorized") as transport:
            assert transport.nodes() is fd.client_ids()  # not copied per round
            res = run(algo, transport, rounds=2, params=tree.params_of(model),
                      callbacks=[Checkpoint(tmp_path / str(n))])
            assert [h["round/replied"] for h in res.history] == [100.0, 100.0]
            assert transport.node_states() == {}  # stateless clients keep nothing
        ckpt = latest_checkpoint(tmp_path / str(n))
        sizes[n] = sum(f.stat().st_size for f in ckpt.iterdir())
    # The same model and 200 clients' traffic either way: only the ids' digits differ.
    assert sizes[1_000_000] < 1.2 * sizes[1_000]


def test_sampled_clients_hold_distinct_rows_and_ranges_are_checked():
    x, y = torch.zeros(50, 2), torch.zeros(50, dtype=torch.int64)
    fd = FederatedDataset.sampled(x, y, 7, 50, seed=1)  # each client: the whole pool, once
    for cid in fd.client_ids():
        rows = fd.client(cid).train.index
        assert sorted(rows.tolist()) == list(range(50))
    bad = Ranges(torch.arange(10), torch.tensor([0, 8]), torch.tensor([5, 5]))
    with pytest.raises(Exception, match="a train range lies outside its buffer of 10 rows"):
        FederatedDataset.from_ranges(x, y, ClientIds(2), bad)
