"""Canaries planted in a run's training data, for the one-run lower bound on ε.

With ``[audit] canaries = m``, :func:`plant_canaries` draws ``m`` canaries before the run
trains: copies of random training examples with a random label (mislabelled examples are what
a model memorises, and what the audit of Steinke, Nasr & Jagielski 2023 uses), each given to a
random client and **included with probability 1/2**, independently. The draw comes from the
operating system's secure source (:func:`secrets.randbits`), not from the run's seed: the seed
is in the config that every participant holds, and a party that knew which canaries are in
could fake the audit. The draw is written to ``RUN/audit/canaries.safetensors`` (the run's
owner is the auditor) and read back when the run resumes, so a resumed run trains on the same
data. Every paradigm of the run trains on the planted federation (the centralized baseline
too: it pools the same clients).

:func:`one_run_audit` then scores every canary by the final model's loss on it (lower loss:
guessed in), and :func:`~shoal.audits.epsilon.best_lower_bound` turns the correct guesses into
a 95 %-confidence lower bound on ε — reported beside the accountant's ε. A lower bound above
the accountant's (an upper bound) means the DP implementation or its accounting is broken.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..config import Config
from ..data.federated import FederatedDataset
from ..data.tasks import Task
from ..errors import CheckpointError, ConfigError
from .epsilon import best_lower_bound
from .membership import loss_threshold_scores

__all__ = ["CANARY_FILE", "Canaries", "canary_problems", "load_canaries", "one_run_audit",
           "plant_canaries"]

log = logging.getLogger(__name__)

CANARY_FILE = Path("audit") / "canaries.safetensors"
"""Where a run keeps its canaries, relative to the run directory."""

CONFIDENCE = 0.95
"""The confidence of the reported lower bound."""


class Canaries:
    """``m`` canaries: inputs ``x``, (wrong) labels ``y``, the position of the client each was
    given to (``owner``) and whether it was planted (``included``)."""

    def __init__(self, x: Tensor, y: Tensor, owner: Tensor, included: Tensor):
        self.x, self.y, self.owner, self.included = x, y, owner, included.bool()

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return f"Canaries({len(self)}, {int(self.included.sum())} planted)"

    @classmethod
    def draw(cls, dataset: FederatedDataset, num_classes: int, m: int) -> Canaries:
        """Draw ``m`` canaries from ``dataset``'s training examples with a secure seed."""
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        pool = dataset.pooled_train()
        rows = torch.randint(0, len(pool), (m,), generator=gen)
        x, y_true = pool.subset(rows).tensors()
        # A label other than the true one: the true label plus 1..num_classes-1, modulo.
        shift = torch.randint(1, num_classes, (m,), generator=gen)
        y = (y_true.to(torch.int64) + shift) % num_classes
        owner = torch.randint(0, len(dataset), (m,), generator=gen)
        included = torch.randint(0, 2, (m,), generator=gen).bool()
        return cls(x.clone(), y.to(y_true.dtype), owner, included)

    def save(self, path: Path) -> None:
        """Write the canaries (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"x": self.x.contiguous(), "y": self.y.contiguous(), "owner": self.owner,
                   "included": self.included.to(torch.uint8)}, str(tmp))
        tmp.replace(path)


def canary_problems(config: Config) -> list[str]:
    """What keeps ``[audit] canaries`` from being applied to ``config``'s run."""
    from ..data.tasks import load_task

    try:
        task = load_task(config.task.name, **config.task.options)
    except Exception:  # noqa: BLE001 - the task's own problem is reported elsewhere
        return []
    if task.num_classes < 2:
        return [f"config field 'audit.canaries': canaries are mislabelled examples, but task "
                f"{config.task.name!r} is a regression (no classes); set audit.canaries = 0."]
    return []


def load_canaries(run_dir: str | Path) -> Canaries | None:
    """The canaries of the run in ``run_dir`` (``None`` when it planted none)."""
    path = Path(run_dir) / CANARY_FILE
    if not path.exists():
        return None
    try:
        t = load_file(str(path))
        return Canaries(t["x"], t["y"], t["owner"], t["included"])
    except (SafetensorError, KeyError, OSError) as e:
        raise CheckpointError(f"audit: {path} is not a readable canary file ({e}); the run's "
                              "canaries are lost, so its one-run audit cannot be made. Start "
                              "a new run to audit.") from e


def plant_canaries(config: Config, task: Task, dataset: FederatedDataset, run_dir: Path, *,
                   resume: bool = False) -> FederatedDataset:
    """``dataset`` with ``config.audit.canaries`` canaries planted (see the module docstring);
    a resumed run reads back the canaries it drew."""
    m = config.audit.canaries
    if not m:
        return dataset
    if task.num_classes < 2:
        raise ConfigError(canary_problems(config)[0])
    canaries = load_canaries(run_dir) if resume else None
    if canaries is None:
        canaries = Canaries.draw(dataset, task.num_classes, m)
        canaries.save(run_dir / CANARY_FILE)
    elif len(canaries) != m or int(canaries.owner.max()) >= len(dataset):
        raise ConfigError(f"audit: the run's {run_dir / CANARY_FILE} holds {len(canaries)} "
                          f"canaries for its federation, but the config asks for {m}; resume "
                          "with the run's own config.")
    keep = canaries.included
    log.info("audit: %d of %d canaries planted in the clients' training data", int(keep.sum()),
             m)
    return dataset.with_rows(canaries.x[keep], canaries.y[keep], canaries.owner[keep])


def one_run_audit(run_dir: Path, model: Any, params: Any, task: Task, *, delta: float,
                  eps_accountant: float | None) -> dict[str, Any]:
    """The one-run lower bound on ε for the model ``params`` trained in ``run_dir``, beside
    the accountant's ε (``None`` without DP)."""
    canaries = load_canaries(run_dir)
    if canaries is None:
        return {"skipped": "the run planted no canaries: set audit.canaries (e.g. 1000) and "
                           "run again"}
    scores = loss_threshold_scores(model, params, (canaries.x, canaries.y), loss_fn=task.loss_fn)
    bound = best_lower_bound(scores, canaries.included, delta, CONFIDENCE)
    out: dict[str, Any] = {
        "canaries": len(canaries), "planted": int(canaries.included.sum()),
        "eps_lower_bound": bound.epsilon, "confidence": CONFIDENCE, "delta": delta,
        "guesses": bound.r, "correct": bound.v, "k_plus": bound.k_plus,
        "k_minus": bound.k_minus, "eps_accountant": eps_accountant}
    if eps_accountant is None:
        out["verdict"] = (f"no DP: nothing bounds ε; the canaries show ε ≥ {bound.epsilon:.3g} "
                          f"at {CONFIDENCE:.0%} confidence")
        out["consistent"] = None
    elif bound.epsilon <= eps_accountant + 1e-9:
        out["verdict"] = (f"consistent: the lower bound {bound.epsilon:.3g} is at most the "
                          f"accountant's ε = {eps_accountant:.3g}")
        out["consistent"] = True
    else:
        out["verdict"] = (f"BUG: the lower bound {bound.epsilon:.3g} exceeds the accountant's "
                          f"ε = {eps_accountant:.3g}; the DP noise, clipping or accounting of "
                          "this run does not hold what it claims")
        out["consistent"] = False
        log.error("audit: %s", out["verdict"])
    return out
