"""ArrayData batches: the same examples whether rows are gathered or sliced."""

from __future__ import annotations

import pytest
import torch

from shoal.data.arrays import ArrayData


@pytest.mark.parametrize("index", [torch.arange(3, 20), torch.tensor([4, 2, 9, 1, 7, 8, 3]),
                                   torch.arange(0, 40, 2), torch.tensor([5]),
                                   torch.tensor([], dtype=torch.int64)],
                         ids=["consecutive", "scattered", "strided", "one", "empty"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_unshuffled_batches_hold_the_rows_of_index_in_order(index, drop_last) -> None:
    x = torch.randn(40, 3)
    y = torch.arange(40)
    data = ArrayData(x, y, index)
    got = list(data.batches(4, drop_last=drop_last))
    stop = len(index) - len(index) % 4 if drop_last else len(index)
    want = [index[s:s + 4] for s in range(0, stop, 4)]
    assert len(got) == len(want)
    for (xb, yb), rows in zip(got, want, strict=True):
        assert torch.equal(xb, x[rows]) and torch.equal(yb, rows)


def test_consecutive_rows_are_views_of_the_pool_not_copies() -> None:
    x = torch.randn(10, 2)
    data = ArrayData(x, torch.zeros(10), torch.arange(2, 9))
    xb, _ = next(data.batches(3))
    assert xb.data_ptr() == x[2:].data_ptr()
