"""How much dropout secure aggregation survives: the fraction of sessions that finish.

100 clients sum a 16-value vector with the default neighbour graph (k = 3 ceil(log2 n) = 21)
over the in-process transport; each client drops its masked input with probability
``--dropout`` (seeded per trial, so every figure reproduces). A session fails when some
survivor's neighbourhood keeps fewer than t survivors (no self-mask seed or key could be
rebuilt). The threshold t must exceed k/2 (the clients refuse less: with t <= k/2 a
coordinator could collect both shares of one client), so heavier dropout needs more
neighbours, not a lower threshold. Every finished session is checked against the exact sum.

    python benchmarks/secagg_dropout.py [--trials 20] [--dropout 0.1 0.2 0.3] [--neighbours 0 30 50]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import final_line, machine  # noqa: E402

D = 16
BOUND = 3.0


def _vector(client: str) -> np.ndarray:
    from shoal.seeding import numpy_rng
    return numpy_rng(0, "dropout-bench", client).normal(size=D)


def session(clients: int, dropout: float, neighbours: int | None, seed: int) -> bool:
    """One session; whether it finished (and then, that its sum is right)."""
    from shoal.secagg import secure_sum
    from shoal.secagg.protocol import MASKED_INPUT, SecAggClient
    from shoal.secagg.quantize import dequantize
    from shoal.sim import InProcessTransport, simulated_dropout

    ids = [f"c{i:03d}" for i in range(clients)]
    client = SecAggClient({"v": lambda m, ctx: [(_vector(ctx.node_id), BOUND)]}, seed)
    transport = InProcessTransport(ids, lambda _: None, client.handlers(),
                                   mods=[simulated_dropout(dropout, seed, (MASKED_INPUT,))])
    res = secure_sum(transport, ids, round=1, session=f"trial-{seed}", task="v", length=D,
                     neighbours=neighbours, seed=seed)
    if res.failed is not None or res.total is None:
        return False
    (got,) = dequantize(res.total, [(D, BOUND)], res.levels)
    want = sum(np.clip(_vector(c), -BOUND, BOUND) for c in res.contributors)
    assert np.allclose(got, want, atol=len(res.contributors) * BOUND / res.levels), "wrong sum"
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--neighbours", type=int, nargs="+", default=[0, 30, 50],
                    help="degrees k to try (0: the default 3 ceil(log2 n))")
    a = ap.parse_args()
    logging.disable(logging.WARNING)  # each refusing client would log its reason
    print(f"secagg_dropout: {machine()}; {a.clients} clients, {a.trials} seeded trials each")
    figures: dict[str, float] = {}
    t0 = time.perf_counter()
    for k in a.neighbours:
        for rate in a.dropout:
            done = sum(session(a.clients, rate, k or None, seed) for seed in range(a.trials))
            label = "default" if k == 0 else str(k)
            print(f"  k = {label:>7}, dropout {rate:.0%}: {done}/{a.trials} sessions finished")
            figures[f"finished_k{label}_drop{round(100 * rate)}"] = done / a.trials
    print(f"({time.perf_counter() - t0:.0f} s)")
    final_line(**figures)


if __name__ == "__main__":
    main()
