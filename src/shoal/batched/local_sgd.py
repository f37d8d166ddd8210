"""Local SGD for a whole cohort at once: stacked client params under ``torch.func.vmap``.

Each client's params are one row of a stacked tensor ``(C, *shape)``; one step computes every
active client's loss with ``vmap`` over its own mini-batch ``(C, B, *x_shape)``, all their
gradients in one backward pass, and applies the SGD step to the stacked tensors in place. The
model's ``nn.Linear`` layers take their step inside that backward pass, accumulating each
client's weight gradient straight into its weights (:mod:`shoal.batched.fused`; layers of at
least ``fuse_min_weights`` weights, by default all when steps are replayed and those of at
least 4,096 weights otherwise, ``None`` turns it off); the other params get autograd's
gradients and the same step afterwards. A loss of ``F.cross_entropy`` is taken on the whole
batch's outputs outside ``vmap`` (one loss per example, then each client's mean). The results'
updates are rows of the stacked deltas (:class:`CohortResult`), which the round's fold can
reduce in one operation per tensor.
Clients with different data sizes are padded, not truncated: a short last batch carries a mask
(padded examples weigh 0, the loss is the mean over the real ones, as ``local_sgd`` computes
it), and clients are sorted by their number of steps so that the clients still training at
step ``s`` are a prefix ``[:k_s]`` of the stack (a view, no copy) and a finished client does no
work.

A step is one function of tensors (:meth:`VectorizedLocalSGD._local_step`); the second time a
step of the same shape comes (same number of active clients, masked or not, same layouts), it
is traced into the graph of ATen operations that vmap and autograd dispatched and replayed from
then on (:mod:`shoal.batched.traced`): the same operations on the same tensors, bit-identical, without
the Python of vmap, ``functional_call``, autograd and the fused layers' rules (about 1.5 ms a
step). Each param's stack is laid out, from the first step on, in the memory layout autograd
gives its gradient (learned once, by a throwaway step of two clients).

Supported: :class:`~shoal.client.LocalSGD` with ``torch.optim.SGD`` (``lr``, ``momentum``,
``weight_decay``), FedProx's ``prox_mu``, ``epochs`` and ``max_steps``, on a model without
training-time state or randomness. Refused with a clear error: other optimizers, SGD's
``dampening``/``nesterov``/``maximize``, BatchNorm running statistics, Dropout (vmap would
draw other random numbers than the sequential executor) and any model ``vmap`` cannot run.

Every client draws its batches from ``torch_generator(info.seed, "batches")``, exactly as
``local_sgd`` does, so it sees the same examples in the same order. The float results differ
from the sequential executor's in the last bits: a batched matrix product, the gradient
accumulated into the weights and the masked mean add in another order than per-client ones.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .. import tree
from ..client import LocalSGD
from ..data.arrays import ArrayData
from ..errors import ConfigError, ModelError
from ..seeding import derive_seeds
from ..tree import Params
from ..types import ClientInfo, ClientResult
from .fused import FUSE_MIN_WEIGHTS, SGDStep, step_linear_layers
from .traced import TracedStep

__all__ = ["CohortResult", "SGDSpec", "VectorizedLocalSGD", "check_vectorizable", "sgd_spec"]

_FIX = "use executor='sequential' or 'processes' (or 'auto', which falls back)"


@dataclass(frozen=True)
class SGDSpec:
    """The plain-SGD hyper-parameters the batched step implements."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0


def sgd_spec(update: object) -> SGDSpec:
    """The SGD settings of a ``local_sgd`` update, or a :class:`ConfigError` saying why the
    vectorized executor cannot run it."""
    if not isinstance(update, LocalSGD):
        raise ConfigError(
            f"vectorized executor: the client update is {update!r} ({type(update).__name__}); "
            f"it runs local_sgd(...) only; {_FIX}."
        )
    opt = update.optimizer
    if not (isinstance(opt, functools.partial) and opt.func is torch.optim.SGD and not opt.args):
        raise ConfigError(
            f"vectorized executor: the client optimizer is {opt!r}; it implements "
            f"torch.optim.SGD (lr, momentum, weight_decay) only; {_FIX}."
        )
    kw = dict(opt.keywords)
    unsupported = {k: v for k, v in kw.items()
                   if k not in ("lr", "momentum", "weight_decay")
                   and not (k in ("dampening",) and v == 0)
                   and not (k in ("nesterov", "maximize", "foreach", "differentiable", "fused")
                            and not v)}
    if unsupported:
        raise ConfigError(
            f"vectorized executor: SGD option(s) {unsupported} are not supported (it implements "
            f"lr, momentum and weight_decay); {_FIX}."
        )
    return SGDSpec(float(kw.get("lr", 1e-3)), float(kw.get("momentum", 0.0)),
                   float(kw.get("weight_decay", 0.0)))


def check_vectorizable(model: nn.Module) -> None:
    """Raise :class:`ModelError` when ``model`` keeps training-time state or draws random
    numbers, which per-client ``vmap`` training cannot reproduce."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise ModelError(
                f"vectorized executor: layer {name!r} ({type(module).__name__}) updates running "
                "statistics while training, which cannot be kept per client under "
                f"torch.func.vmap; {_FIX}, or build the layer with track_running_stats=False "
                "(or use GroupNorm/LayerNorm)."
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ModelError(
                f"vectorized executor: layer {name!r} ({type(module).__name__}) draws random "
                "numbers while training, which vmap cannot draw as the sequential executor "
                f"does; {_FIX}."
            )


@contextlib.contextmanager
def _vmap_errors() -> Iterator[None]:
    """Re-raise an error of ``torch.func.vmap`` running the model as a :class:`ModelError`."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        if "vmap" in str(e) or "functorch" in str(e) or "batching rule" in str(e):
            raise ModelError(f"vectorized executor: the model cannot run under "
                             f"torch.func.vmap: {type(e).__name__}: {e}; {_FIX}.") from e
        raise


@dataclass(frozen=True)
class CohortResult:
    """A batch's results: ``results[i]`` is client ``i``'s (in the order given), and the
    tensors of its update are row ``row[i]`` of the stacks ``deltas`` (``(C, *shape)``, one
    per trainable param), so a consumer can reduce every client's update at once."""

    results: list[ClientResult]
    deltas: Params
    row: list[int]


class VectorizedLocalSGD:
    """``local_sgd`` for many clients in one batched computation; see the module docstring.

    ``fuse_min_weights``: the smallest linear layer that takes its step inside the backward
    pass (``None``: none; ``"auto"``: every layer when steps are replayed, else
    :data:`~shoal.batched.fused.FUSE_MIN_WEIGHTS`); ``trace=False`` runs every step as Python,
    never replayed."""

    def __init__(self, update: LocalSGD, *, fuse_min_weights: int | None | str = "auto",
                 trace: bool = True):
        self.update = update
        self.spec = sgd_spec(update)
        check_vectorizable(update.model)
        self.model = copy.deepcopy(update.model).train()
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.step = SGDStep(self.spec.lr, self.spec.momentum, self.spec.weight_decay,
                            update.prox_mu)
        # Linear layers take their SGD step inside the backward pass (shoal.batched.fused): those
        # with at least fuse_min_weights weights (None: none). "auto": all of them when steps
        # are replayed (the fused layers' Python is not), else the large ones.
        if fuse_min_weights == "auto":
            fuse_min_weights = 0 if trace else FUSE_MIN_WEIGHTS
        if not (fuse_min_weights is None or isinstance(fuse_min_weights, int)):
            raise ValueError(f"VectorizedLocalSGD: fuse_min_weights must be an int, None or "
                             f"'auto' (got {fuse_min_weights!r}).")
        self.fused = [] if fuse_min_weights is None else step_linear_layers(
            self.model, set(self.trainable), self.step, min_weights=fuse_min_weights)
        self._layouts: dict[str, tuple[int, ...]] = {}  # per-client strides of each param
        self._probed = False  # whether _learn_layouts ran
        # The step, replayed as the graph of operations it ran (shoal.batched.traced); trace=False
        # always runs it as Python.
        self._traced = TracedStep(self._local_step, enabled=trace)
        for n, p in self.model.named_parameters():
            if n in self.fused and p.dim() == 2:  # (out, in) stored as (in, out)
                self._layouts[n] = (1, p.shape[0])
        loss_fn = update.loss_fn
        model = self.model

        def loss_full(p: Params, const: Params, x: Tensor, y: Tensor) -> Tensor:
            return loss_fn(functional_call(model, {**p, **const}, (x,)), y)

        def loss_masked(p: Params, const: Params, x: Tensor, y: Tensor, m: Tensor) -> Tensor:
            out = functional_call(model, {**p, **const}, (x,))  # (B, ...)
            per = vmap(loss_fn)(out.unsqueeze(1), y.unsqueeze(1))  # (B,) one loss per example
            return (per * m).sum() / m.sum().clamp(min=1.0)

        # One loss per client, (k,); the gradient of their sum with respect to the stacked
        # params is every client's own gradient (client c's loss depends on row c only). One
        # backward pass through the batched graph is cheaper than vmap(grad(...)).
        self._full = vmap(loss_full, in_dims=(0, None, 0, 0))
        self._masked = vmap(loss_masked, in_dims=(0, None, 0, 0, 0))
        # F.cross_entropy (the loss of every built-in task) is taken outside vmap instead, on
        # the whole batch's outputs with one loss per example: the same losses in a few
        # operations, where vmap runs a decomposition of about twenty.
        self._outputs = vmap(lambda p, const, x: functional_call(model, {**p, **const}, (x,)),
                             in_dims=(0, None, 0)) if loss_fn is F.cross_entropy else None
        self._pool_ignores: tuple[Tensor, bool] | None = None  # (targets, any == -100)

    def __repr__(self) -> str:
        return f"VectorizedLocalSGD({self.update!r})"

    def _stack(self, t: Tensor, c: int, name: str) -> Tensor:
        """``c`` copies of one client's ``t`` as a stack ``(c, *shape)`` in the layout learned
        for ``name`` (see ``_learn_layouts``)."""
        inner = self._layouts.get(name)
        if inner is None:
            return t.detach().unsqueeze(0).expand(c, *t.shape).clone(
                memory_format=torch.contiguous_format)
        # The dims from outermost to innermost in memory; copy in that order (sequential
        # writes), then view the result in the param's own dim order.
        order = sorted(range(len(inner)), key=lambda d: -inner[d])
        back = [0] + [order.index(d) + 1 for d in range(len(inner))]
        one = t.detach().permute(order).contiguous()
        return one.unsqueeze(0).expand(c, *one.shape).clone().permute(back)

    def _cross_entropy_outside(self, y: Tensor) -> bool:
        """Whether the loss is taken outside vmap for targets from the pool ``y``: the loss is
        ``F.cross_entropy`` and no target is its ``ignore_index`` (-100), which its mean
        leaves out of the count."""
        if self._outputs is None:
            return False
        if self._pool_ignores is None or self._pool_ignores[0] is not y:
            ignores = not y.is_floating_point() and bool((y == -100).any())
            self._pool_ignores = (y, ignores)
        return not self._pool_ignores[1]

    def _losses(self, leaves: Params, const: Params, xb: Tensor, yb: Tensor,
                weights: Tensor | None, outside: bool) -> Tensor:
        """Every client's loss ``(k,)`` (see ``_cross_entropy_outside`` for ``outside``)."""
        if not outside:
            return (self._full(leaves, const, xb, yb) if weights is None
                    else self._masked(leaves, const, xb, yb, weights))
        assert self._outputs is not None
        out = self._outputs(leaves, const, xb)  # (k, B, ...)
        k, b = yb.shape[:2]
        per = F.cross_entropy(out.flatten(0, 1), yb.flatten(0, 1), reduction="none")
        per = per.view(k, b, -1)  # (k, B, positions): one loss per example and position
        if weights is None:
            return per.flatten(1).mean(1)  # loss_fn's mean over the batch
        return (per.mean(2) * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def _gradients(self, view: Params, const: Params, xb: Tensor, yb: Tensor,
                   weights: Tensor | None, outside: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """The clients' losses ``(k,)`` and the gradients of the params that are not fused
        (the fused layers take their step inside this backward pass)."""
        leaves = {n: t.detach().requires_grad_() for n, t in view.items()}
        with torch.enable_grad():
            loss = self._losses(leaves, const, xb, yb, weights, outside)
            # A fused layer's gradient is None; so is that of a param the loss does not use,
            # which takes no step (as SGD).
            found = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
        return loss.detach(), {n: g for n, g in zip(leaves, found, strict=True) if g is not None}

    def _local_step(self, view: Params, buffers: Params, anchors: Params, corrections: Params,
                    const: Params, xb: Tensor, yb: Tensor, weights: Tensor | None,
                    outside: bool) -> Tensor:
        """One local step of the ``k`` clients whose params are ``view`` (rows ``[:k]`` of the
        stacks), in place, with momentum ``buffers``, FedProx ``anchors`` and gradient
        ``corrections``; their losses. Every tensor it reads or writes is an argument, so
        :class:`TracedStep` can replay it (``weights``: the batch mask, ``None`` when every
        example is real)."""
        step = self.step
        step.buffers, step.anchors, step.corrections = buffers, anchors, corrections
        loss, grads = self._gradients(view, const, xb, yb, weights, outside)
        for n, g in grads.items():
            step.apply_(n, view[n], g)
        # Held by the caller (a trace's are fake).
        step.buffers, step.anchors, step.corrections = {}, {}, {}
        return loss

    def _learn_layouts(self, params: Params, const: Params, datas: Sequence[ArrayData],
                       x: Tensor, y: Tensor) -> None:
        """Once per trainer: one throwaway step of two clients on a real batch, keeping for
        each param the memory layout autograd gives its gradient, so that every stack is made
        in that layout from the start."""
        if self._probed:
            return
        data = next((d for d in datas if len(d)), None)
        if data is None:
            return
        self._probed = True
        b = self.update.batch_size
        rows = data.index[torch.arange(b) % len(data)]
        xr, yr = x.index_select(0, rows), y.index_select(0, rows)
        xb = xr.expand(2, *xr.shape).contiguous()  # (2, B, *x_shape), as a gathered batch
        yb = yr.expand(2, *yr.shape).contiguous()
        two = {n: self._stack(params[n], 2, n) for n in self.trainable}
        step = self.step
        step.begin(2, first=True)
        step.buffers = {n: torch.zeros_like(t) for n, t in two.items()}
        step.anchors = {n: self._stack(params[n], 1, n) for n in two}
        for n, g in self._gradients(two, const, xb, yb, None, False)[1].items():
            # The backward pass of a batched matrix product gives weight gradients in a
            # transposed layout, (k, out, in) with strides (out * in, 1, out); a step adding
            # such a gradient to row-major params reads memory out of order (5x slower for a
            # large layer). Params kept in the gradient's layout make the step one sweep.
            if g.stride()[0] == math.prod(g.shape[1:]):
                self._layouts[n] = g.stride()[1:]
        step.buffers, step.anchors = {}, {}

    def _corrections(self, params: Params, corrections: Sequence[Params | None],
                     ordered: list[int]) -> Params:
        """The clients' gradient corrections as stacks ``(C, *shape)`` in the trainer's client
        order and each param's stack layout (zeros where a client has none)."""
        c = len(ordered)
        out: Params = {}
        for n in self.trainable:
            stack = self._stack(torch.zeros_like(params[n]), c, n)
            for j, i in enumerate(ordered):
                got = corrections[i]
                if got is not None and n in got:
                    stack[j].copy_(got[n])
            out[n] = stack
        return out

    def steps(self, n: int) -> int:
        """How many local steps a client of ``n`` examples takes (as ``local_sgd``)."""
        u = self.update
        per_epoch = math.ceil(n / u.batch_size)
        total = per_epoch * u.epochs
        return total if u.max_steps is None else min(total, u.max_steps)

    def schedule(self, data: ArrayData, info: ClientInfo) -> Tensor:
        """Client's batches as rows ``(steps, B)`` of pool row numbers, ``-1`` for padding; the
        same batches ``local_sgd`` draws."""
        rows = torch.full((1, self.steps(len(data)), self.update.batch_size), -1,
                          dtype=torch.int64)
        self.schedules([data], [info], rows)
        return rows[0]

    def schedules(self, datas: Sequence[ArrayData], infos: Sequence[ClientInfo],
                  rows: Tensor) -> None:
        """Write client ``j``'s batches (see :meth:`schedule`) into ``rows[j]`` (``(C, S, B)``,
        filled with ``-1``): one permutation per client and epoch from the client's own
        generator, then one gather and one scatter for the whole cohort."""
        b, s_max = self.update.batch_size, rows.shape[1]
        perms: list[Tensor] = []  # positions within the client's rows, one piece per epoch
        keeps: list[int] = []  # examples each piece places (max_steps may cut the last epoch)
        offsets: list[int] = []  # where the piece's client starts in the concatenated indices
        starts: list[int] = []  # where the piece goes in rows.view(-1)
        offset = 0
        # torch_generator(info.seed, "batches") for every client, the seeds derived together.
        seeds = derive_seeds([(info.seed, "batches") for info in infos])
        g = torch.Generator()  # reseeded per client: the same stream as a fresh generator
        for j, (data, seed) in enumerate(zip(datas, seeds, strict=True)):
            n = len(data)
            steps = self.steps(n)
            if n:
                g.manual_seed(seed)
                per_epoch = math.ceil(n / b)
                for e in range(math.ceil(steps / per_epoch)):
                    keep = min(n, (steps - e * per_epoch) * b)
                    perm = torch.randperm(n, generator=g)
                    perms.append(perm if keep == n else perm[:keep])
                    keeps.append(keep)
                    offsets.append(offset)
                    starts.append((j * s_max + e * per_epoch) * b)
            offset += n
        if not perms:
            return
        local = torch.cat(perms)
        counts = torch.tensor(keeps)
        pool_rows = torch.cat([d.index for d in datas])[
            local + torch.repeat_interleave(torch.tensor(offsets), counts)]
        first = torch.cumsum(counts, 0) - counts  # where each piece starts in `local`
        where = torch.repeat_interleave(torch.tensor(starts) - first, counts) \
            + torch.arange(len(local))
        rows.view(-1)[where] = pool_rows

    def __call__(self, params: Params, datas: Sequence[ArrayData],
                 infos: Sequence[ClientInfo]) -> list[ClientResult]:
        """One :class:`ClientResult` per client, as ``local_sgd`` would compute them (within
        float rounding). All ``datas`` must be views of the same pool tensors."""
        return self.cohort(params, datas, infos).results

    def trial(self, data: ArrayData) -> None:
        """Train one client on two of ``data``'s examples from the model's own params; raises
        what the batched computation raises (an operation vmap cannot batch shows only when
        it runs)."""
        if len(data) == 0:
            return
        self(tree.params_of(self.update.model), [data.subset(torch.arange(min(2, len(data))))], [ClientInfo("trial", 0, 0)])

    @property
    def numel(self) -> int:
        """Trainable parameters per client."""
        return sum(p.numel() for n, p in self.model.named_parameters() if n in self.trainable)

    def cohort(self, params: Params, datas: Sequence[ArrayData],
               infos: Sequence[ClientInfo],
               corrections: Sequence[Params | None] | None = None) -> CohortResult:
        """Like calling the trainer, but also giving the stacked updates the results are rows
        of (see :class:`CohortResult`). ``corrections[i]`` (trainable param name -> tensor, or
        ``None`` for zeros) is added to client ``i``'s gradient at every step, as
        ``LocalSGD.train(correction=...)`` does."""
        if not datas:
            return CohortResult([], {}, [])
        x, y = datas[0].x, datas[0].y
        if any(d.x is not x or d.y is not y for d in datas):
            raise ModelError("vectorized executor: the clients' data are not views of one shared "
                             "pool (ArrayData.x / .y differ); group clients by pool.")
        steps = torch.tensor([self.steps(len(d)) for d in datas])
        order = torch.argsort(steps, descending=True, stable=True)  # active clients: a prefix
        c, s_max, b = len(datas), int(steps.max()), self.update.batch_size
        rows = torch.full((c, s_max, b), -1, dtype=torch.int64)  # (C, S, B)
        ordered = order.tolist()
        self.schedules([datas[i] for i in ordered], [infos[i] for i in ordered], rows)
        mask = rows >= 0
        # Padding reads the pool's row 0 (any real row: its output is multiplied by 0). Step
        # major, so that a step's rows are one contiguous index for index_select (several
        # times faster than x[rows], which goes through advanced indexing).
        by_step = rows.clamp(min=0).transpose(0, 1).contiguous()  # (S, C, B)
        maskf = mask.to(x.dtype if x.is_floating_point() else torch.float32)
        active = [int((steps > s).sum()) for s in range(s_max)]

        const = {k: v for k, v in params.items() if k not in self.trainable}
        with _vmap_errors():
            self._learn_layouts(params, const, datas, x, y)
        stacked = {k: self._stack(params[k], c, k) for k in self.trainable}  # (C, *shape)
        step = self.step
        anchors = {k: self._stack(params[k], 1, k) for k in stacked} if step.prox_mu else {}
        buffers = {k: torch.zeros_like(v) for k, v in stacked.items()} if step.momentum else {}
        corr = self._corrections(params, corrections, ordered) if corrections else {}
        loss_sum = torch.zeros(c, dtype=torch.float64)
        outside = self._cross_entropy_outside(y)
        for s in range(s_max):
            k = active[s]
            step.begin(k, first=s == 0)
            idx, m = by_step[s, :k].view(-1), mask[:k, s]  # (k * B,), (k, B)
            xb = x.index_select(0, idx).view(k, b, *x.shape[1:])  # (k, B, *x_shape)
            yb = y.index_select(0, idx).view(k, b, *y.shape[1:])  # (k, B, ...)
            view = {n: t[:k] for n, t in stacked.items()}
            weights = None if bool(m.all()) else maskf[:k, s]
            with _vmap_errors():
                # The step's graph depends on k and, with momentum, on whether this is the
                # round's first step (the buffers start from the gradient).
                loss_sum[:k] += self._traced((k, step.first and bool(step.momentum)), view,
                                             buffers, anchors, corr, const, xb, yb, weights,
                                             outside)
        # Every client's update in one in-place subtraction per tensor, (C, *shape): client j's
        # update is row j (a view; a consumer that ships it elsewhere clones it). In place, and
        # with the global params first copied into the stack's layout: a fresh 20 MB result
        # costs page faults, and a subtraction across two layouts reads one out of order.
        deltas = {k: stacked[k].sub_(self._stack(params[k], 1, k)) for k in stacked}
        examples_per = mask.sum(dim=(1, 2)).tolist()
        loss_per = loss_sum.tolist()
        steps_per = steps.tolist()
        rows_of = {k: t.unbind(0) for k, t in deltas.items()}  # every row's view in one call
        frozen = {k: torch.zeros_like(v) for k, v in params.items() if k not in deltas}
        results: list[ClientResult | None] = [None] * c
        row = [0] * c
        for j, i in enumerate(ordered):
            n_steps = steps_per[i]
            update = {k: (rows_of[k][j] if k in rows_of else frozen[k].clone()) for k in params}
            metrics = {"train/loss": loss_per[j] / max(n_steps, 1),
                       "train/steps": float(n_steps), "train/examples": float(examples_per[j])}
            results[i] = ClientResult(update, float(len(datas[i])), metrics)
            row[i] = j
        return CohortResult([r for r in results if r is not None], deltas, row)
