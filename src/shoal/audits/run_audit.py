"""``shoal audit RUN_DIR``: the audits run against a finished run, from what it left on disk.

A run directory holds the resolved config, each paradigm's final model and — when the config's
``[audit]`` asked for it (``capture_rounds``) — what the coordinator received in those rounds
(:mod:`shoal.audits.views`). From these, :func:`audit_run` measures:

* ``inversion`` — for every update the coordinator (federated) or the first peer (swarm: the
  other peers' update blobs it fetched) received in a captured round, the analytic
  attack on the model's first fully connected layer
  (:func:`~shoal.audits.inversion.analytic_recovery`); a client counts as exposed when the
  recovered input equals one of its own training examples (``max |x_hat - x| <= 1e-4``). Under
  secure aggregation the coordinator holds masked inputs only; they are attacked as they are.
* ``membership`` — the loss-threshold attack on the final model (Yeom et al. 2018): the
  clients' training examples (members) against the task's test examples (non-members), as
  many of each; AUC, TPR at 1 % and 0.1 % FPR, and the ROC curve.
* ``lira`` — the likelihood-ratio attack with shadow models (Carlini et al. 2022, online) on
  the same members and non-members: ``[audit] shadow_models`` shadows, each trained on a
  random half of those candidates with the run's client recipe (optimizer, batch size; DP-SGD
  with the run's noise multiplier under ``privacy.mode = "sample"``) for as many examples as
  the paradigm saw — the attacker's copy of the training, centralized. With DP, the TPR at
  0.1 % FPR is shown beside the most that (ε, δ) allows.
* ``epsilon`` — the one-run lower bound on ε from the canaries the run planted
  (``[audit] canaries``; :mod:`shoal.audits.planted`), beside the accountant's ε.

The figures go to ``RUN_DIR/audit.json`` (one entry per paradigm) for the report. The
federation is rebuilt from the config, as the run built it; no data leaves the machine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..algorithms.swarm import BLOB
from ..client import local_sgd
from ..config import load_config
from ..data.arrays import ArrayData
from ..data.tasks import load_task
from ..errors import CheckpointError, ConfigError
from ..experiment import client_optimizer, initial_params, make_dataset, resolve_config
from ..ledger.blobs import blob_params
from ..privacy.dpsgd import DPSGD
from ..tree import Params, add
from ..types import ClientInfo
from .inversion import analytic_recovery, exact_recovery
from .membership import (
    LiRA,
    epsilon_bound_tpr,
    loss_threshold_scores,
    membership_auc,
    roc,
    tpr_at_fpr,
)
from .planted import one_run_audit
from .views import load_views

__all__ = ["AUDITS", "audit_run", "first_dense_layer", "roc_points"]

AUDITS = ("inversion", "membership", "lira", "epsilon")
"""The audits ``shoal audit`` runs on a finished run."""

TOL = 1e-4
ROC_POINTS = 200
"""At most this many points of each ROC curve go into ``audit.json`` (for the report)."""
MAX_SHADOW_EPOCHS = 50


def roc_points(scores: Any, is_member: Any, points: int = ROC_POINTS) -> dict[str, list[float]]:
    """The ROC curve of ``scores`` thinned to about ``points`` points (always keeping the
    first and the last), as ``{"fpr": [...], "tpr": [...]}``."""
    fpr, tpr, _ = roc(scores, is_member)
    keep = sorted(set(torch.linspace(0, len(fpr) - 1, min(points, len(fpr))).round().long()
                      .tolist()))
    return {"fpr": [float(fpr[i]) for i in keep], "tpr": [float(tpr[i]) for i in keep]}


SKIP_INVERSION = {
    "centralized": "the centralized baseline receives the raw data itself: nothing to invert",
    "split": "a split server receives activations and gradients, not model updates; its "
             "leakage is measured by the split run's own label-leakage metrics (split/...)",
    "data_parallel": "data-parallel workers share one trust domain (all-reduce of gradients "
                     "among the owner's own machines): no outside party receives updates",
}


def first_dense_layer(params: Params) -> str | None:
    """The name of the first layer with a 2-D ``weight`` and a ``bias`` (a fully connected
    layer the analytic attack applies to), if it comes before any other weight; else ``None``."""
    for name, t in params.items():
        if not name.endswith(".weight"):
            continue
        layer = name[:-len(".weight")]
        return layer if t.dim() == 2 and f"{layer}.bias" in params else None
    return None


def _inversion(run_dir: Path, paradigm: str, config: Any, dataset: Any,
               template: Params) -> dict[str, Any]:
    if paradigm not in ("federated", "swarm"):
        return {"skipped": SKIP_INVERSION.get(paradigm, f"paradigm {paradigm!r} receives no "
                                                        "model updates to invert")}
    views = sorted((run_dir / paradigm / "views").glob("round-*.safetensors"))
    if not views:
        return {"skipped": "no captured views: set audit.capture_rounds (e.g. [1]) and run "
                           "again"}
    layer = first_dense_layer(template)
    if layer is None:
        return {"skipped": "the model's first layer is not fully connected with a bias; the "
                           "analytic attack does not apply"}
    exposed: set[str] = set()
    attacked = clients = 0
    kinds: dict[str, int] = {}
    for path in views:
        for (sender, kind), tensors in load_views(path).items():
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == BLOB and "blob" in tensors:  # a swarm peer's update, as fetched
                tensors = blob_params(tensors["blob"].numpy().tobytes())
            w, b = tensors.get(f"{layer}.weight"), tensors.get(f"{layer}.bias")
            if w is None or b is None or w.shape != template[f"{layer}.weight"].shape:
                continue
            attacked += 1
            x_hat = analytic_recovery({f"{layer}.weight": w.double(),
                                       f"{layer}.bias": b.double()}, layer)
            try:
                train = dataset.client(sender).train
            except (KeyError, ValueError, IndexError):
                continue
            clients += 1
            x, _ = train.tensors()
            if x_hat is not None and any(exact_recovery(x_hat.float(), row.reshape(-1), TOL)
                                         for row in x.reshape(len(x), -1)):
                exposed.add(sender)
    return {"rounds_captured": len(views), "messages_by_kind": kinds,
            "updates_attacked": attacked, "clients_attacked": clients,
            "clients_exposed": len(exposed), "exposed": sorted(exposed)}


def _candidates(config: Any, task: Any, dataset: Any) -> tuple[Any, Any, Any]:
    """Members (the clients' training examples) and as many non-members (the task's test
    examples), drawn with the run's seed: ``(x, y, is_member)``."""
    members = [dataset.client(c).train.tensors() for c in dataset.client_ids()]
    mx = torch.cat([x for x, _ in members])
    my = torch.cat([y for _, y in members])
    nx, ny = task.test.tensors()
    n = min(len(my), len(ny))
    g = torch.Generator().manual_seed(config.seed)
    pick_m = torch.randperm(len(my), generator=g)[:n]
    pick_n = torch.randperm(len(ny), generator=g)[:n]
    x = torch.cat([mx[pick_m], nx[pick_n]])
    y = torch.cat([my[pick_m], ny[pick_n]])
    is_member = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    return x, y, is_member


def _final_params(run_dir: Path, paradigm: str) -> Params:
    path = run_dir / paradigm / "model.safetensors"
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise CheckpointError(f"audit: {path} is not a readable model file ({e}); run the "
                              "paradigm again (`shoal run --resume`).") from e


def _membership(run_dir: Path, paradigm: str, config: Any, task: Any, dataset: Any,
                model: Any) -> dict[str, Any]:
    x, y, is_member = _candidates(config, task, dataset)
    scores = loss_threshold_scores(model, _final_params(run_dir, paradigm), (x, y),
                                   loss_fn=task.loss_fn)
    n = int(is_member.sum())
    return {"attack": "loss threshold", "members": n, "non_members": len(y) - n,
            "auc": membership_auc(scores, is_member),
            "tpr_at_1%_fpr": tpr_at_fpr(scores, is_member, 0.01),
            "tpr_at_0.1%_fpr": tpr_at_fpr(scores, is_member, 0.001),
            "roc": roc_points(scores, is_member)}


def _summary_entry(run_dir: Path, paradigm: str) -> dict[str, Any]:
    try:
        results = json.loads((run_dir / "summary.json").read_text()).get("results", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return next((r for r in results if isinstance(r, dict) and r.get("paradigm") == paradigm),
                {})


def _history(run_dir: Path, paradigm: str) -> list[dict[str, Any]]:
    from ..callbacks import read_metrics
    path = run_dir / paradigm / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def _lira(run_dir: Path, paradigm: str, config: Any, task: Any, dataset: Any,
          model: Any) -> dict[str, Any]:
    x, y, is_member = _candidates(config, task, dataset)
    entry = _summary_entry(run_dir, paradigm)
    history = _history(run_dir, paradigm)
    examples = float(entry.get("examples") or sum(h.get("train/examples", 0.0)
                                                    for h in history))
    half = max(1, len(y) // 2)
    epochs = int(min(MAX_SHADOW_EPOCHS, max(1, round(examples / half))))
    noise = next((h["dp/noise_multiplier"] for h in reversed(history)
                  if "dp/noise_multiplier" in h), None)
    recipe: Any
    if noise is not None and config.privacy.mode == "sample":
        p = config.privacy
        recipe = DPSGD(model, task.loss_fn, noise_multiplier=noise, max_grad_norm=p.clip_norm,
                       batch_size=config.client.batch_size, epochs=epochs,
                       optimizer=client_optimizer(config), grad_sample_mode=p.grad_sample_mode)
    else:
        recipe = local_sgd(model, task.loss_fn, epochs=epochs,
                           batch_size=config.client.batch_size,
                           optimizer=client_optimizer(config))
    _, params0 = initial_params(config, task)
    pool = (x, y)

    def train(positions: torch.Tensor, seed: int) -> Params:
        data = ArrayData(pool[0], pool[1], positions)
        result = recipe(params0, data, ClientInfo("shadow", 1, seed, {}))
        return add(params0, result.update)

    shadows = config.audit.shadow_models
    lira = LiRA(train, model, pool, n_shadows=shadows, seed=config.seed).fit()
    scores = lira.scores(_final_params(run_dir, paradigm))
    out: dict[str, Any] = {
        "attack": "LiRA (online)", "shadow_models": shadows, "shadow_epochs": epochs,
        "shadow_recipe": "DP-SGD" if noise is not None and config.privacy.mode == "sample"
        else "SGD", "members": int(is_member.sum()),
        "non_members": int((~is_member).sum()), "auc": membership_auc(scores, is_member),
        "tpr_at_1%_fpr": tpr_at_fpr(scores, is_member, 0.01),
        "tpr_at_0.1%_fpr": tpr_at_fpr(scores, is_member, 0.001),
        "roc": roc_points(scores, is_member)}
    eps = (entry.get("privacy") or {}).get("epsilon")
    if eps is not None:
        allowed = epsilon_bound_tpr(0.001, eps, config.privacy.delta)
        out["dp_allows_tpr_at_0.1%_fpr"] = allowed
        out["within_dp_bound"] = out["tpr_at_0.1%_fpr"] <= allowed + 1e-12
    return out


def _epsilon(run_dir: Path, paradigm: str, config: Any, task: Any, model: Any,
             ) -> dict[str, Any]:
    eps = (_summary_entry(run_dir, paradigm).get("privacy") or {}).get("epsilon")
    delta = config.privacy.delta if config.privacy.mode != "off" else 1e-5
    return one_run_audit(run_dir, model, _final_params(run_dir, paradigm), task, delta=delta,
                         eps_accountant=eps)


def audit_run(run_dir: str | Path, only: Sequence[str] = (), *,
              trust_code: bool = False) -> dict[str, Any]:
    """Run the audits (``only``: a subset of :data:`AUDITS`) on every paradigm of the run in
    ``run_dir``; write and return ``{paradigm: {audit: figures}}``. A task the run's config
    names as code (``task.name = "module:factory"``) is rebuilt only with ``trust_code=True``:
    rebuilding it imports and calls that code, so a run directory someone else wrote could run
    anything on this machine (``task.name = "os:system"``)."""
    run_dir = Path(run_dir)
    unknown = sorted(set(only) - set(AUDITS))
    if unknown:
        raise ConfigError(f"audit: unknown audit(s) {unknown}; choose from {list(AUDITS)}.")
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"audit: {str(run_dir)!r} holds no config.toml; give the "
                              "directory of a run (`shoal run --out DIR`).")
    config = load_config(run_dir / "config.toml")
    if ":" in config.task.name and not trust_code:
        raise ConfigError(
            f"audit: the task {config.task.name!r} is code named by "
            f"{run_dir / 'config.toml'}, and rebuilding it would run that code; audit a run "
            "you trust with `shoal audit --trust-code` (audit_run(..., trust_code=True)).")
    task = load_task(config.task.name, **config.task.options)
    config = resolve_config(config, task, quiet=True)
    dataset = make_dataset(config, task)
    model, template = initial_params(config, task)
    chosen = list(only) or list(AUDITS)
    out: dict[str, Any] = {}
    for paradigm_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        paradigm = paradigm_dir.name
        if not (paradigm_dir / "model.safetensors").exists():
            continue
        entry: dict[str, Any] = {}
        if "inversion" in chosen:
            entry["inversion"] = _inversion(run_dir, paradigm, config, dataset, template)
        if "membership" in chosen:
            entry["membership"] = _membership(run_dir, paradigm, config, task, dataset, model)
        if "lira" in chosen:
            entry["lira"] = _lira(run_dir, paradigm, config, task, dataset, model)
        if "epsilon" in chosen:
            entry["epsilon"] = _epsilon(run_dir, paradigm, config, task, model)
        out[paradigm] = entry
    tmp = run_dir / "audit.json.tmp"
    tmp.write_text(json.dumps(out, indent=1, default=lambda v: None if isinstance(
        v, float) and math.isnan(v) else v))
    tmp.replace(run_dir / "audit.json")
    return out
