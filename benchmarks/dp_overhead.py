"""What DP-SGD costs per step over non-private SGD, on the core issue's Fashion-MNIST CNN.

Workload (issue "privacy"): the CNN of McMahan et al. 2017 (1,663,370 parameters), batch 64,
SGD lr 0.05, on CPU. Each variant is shoal's own client update on one client of 6,400
Fashion-MNIST training images, timed over ``--steps`` local steps after 3 warm-up steps:

* ``plain``: ``local_sgd`` (batches of exactly 64);
* ``bookkeeping``: ``dp_sgd()``'s default — Poisson batches of expected size 64, Opacus' ghost
  clipping (per-sample gradient *norms* without materialising per-sample gradients of the
  1.6 M-weight linear layer; conv layers get per-sample gradients) finished in one backward
  pass (book-keeping, Bu et al. 2023; :mod:`shoal.privacy.bookkeeping`), noise σ = 1.0, the
  noise and the Poisson sampling drawn from the secret keystream (the default);
* ``torch_rng``: the same, but the noise and the Poisson sampling drawn by torch's default
  generator (``torch.normal`` / ``torch.rand``, the Mersenne Twister: what DP-SGD used before
  its randomness became secret, and what Opacus uses outside its secure mode), so
  ``secure_noise_ratio`` (bookkeeping / torch_rng) is what the AES-CTR keystream costs;
* ``ghost``: ``dp_sgd(grad_sample_mode="ghost")`` — Opacus' ghost clipping as shipped (two
  backward passes);
* ``hooks``: ``dp_sgd(grad_sample_mode="hooks")`` — Opacus materialises every per-sample
  gradient (64 x 1.66 M floats per step).

Variants run in their own processes, alternating, ``--reps`` times; figures are medians of
the per-step time: CPU time of the process with ``--threads 1`` (robust on a shared machine),
wall time otherwise. ``dpsgd_step_ratio`` is the fastest secret DP mode's over plain's.

    python benchmarks/dp_overhead.py [--reps 3] [--steps 20] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, emit, final_line, machine, median  # noqa: E402

BATCH, LR, SIGMA, CLIP, CLIENT_EXAMPLES = 64, 0.05, 1.0, 1.0, 6400


class _TorchDraws:
    """What DP-SGD asks of its generator, drawn by torch's default generator (not secret)."""

    def normal(self, shape, std, dtype):
        return torch.normal(0.0, std, tuple(shape), dtype=dtype)

    def random(self, n):
        return torch.rand(n, dtype=torch.float64)


def variant(name: str, steps: int, threads: int, quick: bool) -> dict:
    """Time ``steps`` local steps of one variant (after 3 warm-up steps)."""
    import functools

    import torch.nn.functional as F

    from shoal import tree
    from shoal.client import local_sgd
    from shoal.data.task_fashion_mnist import fashion_mnist
    from shoal.privacy import dp_sgd
    from shoal.types import ClientInfo

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    task = fashion_mnist(model="mlp" if quick else "cnn")
    data = task.train.subset(torch.arange(CLIENT_EXAMPLES))
    torch.manual_seed(0)
    model = task.model_fn()
    opt = functools.partial(torch.optim.SGD, lr=LR)

    def make(max_steps: int):
        if name == "plain":
            return local_sgd(model, F.cross_entropy, batch_size=BATCH, optimizer=opt,
                             max_steps=max_steps)
        return dp_sgd(model, F.cross_entropy, noise_multiplier=SIGMA, max_grad_norm=CLIP,
                      batch_size=BATCH, max_steps=max_steps, optimizer=opt,
                      grad_sample_mode="bookkeeping" if name == "torch_rng" else name)

    if name == "torch_rng":  # the baseline only: DP-SGD's draws from torch's generator
        import shoal.privacy.dpsgd
        shoal.privacy.dpsgd.privacy_generator = lambda *_: _TorchDraws()  # type: ignore

    params = tree.params_of(model)
    make(3)(params, data, ClientInfo("c", 0, 1))  # warm-up (and the replica's first build)
    update_fn = make(steps)
    update_fn.wrapped() if name != "plain" else update_fn.replica()
    t0, c0 = time.perf_counter(), time.process_time()
    result = update_fn(params, data, ClientInfo("c", 1, 2))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = result.metrics["train/steps"]
    return {"step_s": seconds / steps, "step_cpu_s": cpu / steps,
            "examples_per_step": result.metrics["train/examples"] / result.metrics["train/steps"],
            "params": tree.numel(params)}


def main() -> None:
    """Parent: alternate the variants in child processes and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="bookkeeping,torch_rng,ghost,hooks")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the MLP, 3 steps, 1 rep")
    a = ap.parse_args()
    if a.quick:
        a.reps, a.steps = 1, 3
    if a.variant:
        emit(variant(a.variant, a.steps, a.threads, a.quick))
        return
    print(f"dp_overhead: {machine()}; {a.threads} thread(s), batch {BATCH}, {a.steps} steps, "
          f"{a.reps} reps{' (QUICK: MLP, not the CNN)' if a.quick else ''}", flush=True)
    modes = [m for m in a.modes.split(",") if m]
    extra = ["--steps", str(a.steps), "--threads", str(a.threads)] + (["--quick"] if a.quick
                                                                       else [])
    runs = alternate(__file__, ["plain", *modes], a.reps, extra)
    # With one thread, the process's CPU time is the step's cost even when other jobs share
    # the cores (wall time then includes waiting); the ratio uses it, wall time is shown too.
    key = "step_cpu_s" if a.threads == 1 else "step_s"
    plain, plain_wall = median(runs["plain"], key), median(runs["plain"], "step_s")
    print(f"model parameters: {runs['plain'][0]['params']:,}")
    print(f"plain SGD step: {plain * 1000:.1f} ms ({key}; wall {plain_wall * 1000:.1f} ms)")
    ratios = {}
    for m in modes:
        s = median(runs[m], key)
        ratios[m] = s / plain
        print(f"DP-SGD step ({m}): {s * 1000:.1f} ms = {ratios[m]:.2f}x plain (wall "
              f"{median(runs[m], 'step_s') / plain_wall:.2f}x; mean Poisson batch "
              f"{median(runs[m], 'examples_per_step'):.1f})")
    secret = {m: r for m, r in ratios.items() if m != "torch_rng"}
    best = min(secret, key=secret.__getitem__)
    print(f"fastest DP mode: {best} (ratio from {key})")
    figures = {"dpsgd_step_ratio": ratios[best]}
    if "torch_rng" in ratios and "bookkeeping" in ratios:
        figures["secure_noise_ratio"] = ratios["bookkeeping"] / ratios["torch_rng"]
    final_line(**figures)


if __name__ == "__main__":
    main()
