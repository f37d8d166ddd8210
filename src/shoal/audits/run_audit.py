"""``shoal audit RUN_DIR``: the audits run against a finished run, from what it left on disk.

A run directory holds the resolved config, each paradigm's final model and — when the config's
``[audit]`` asked for it (``capture_rounds``) — what the coordinator received in those rounds
(:mod:`shoal.audits.views`). From these, :func:`audit_run` measures:

* ``inversion`` — for every update the coordinator received in a captured round, the analytic
  attack on the model's first fully connected layer
  (:func:`~shoal.audits.inversion.analytic_recovery`); a client counts as exposed when the
  recovered input equals one of its own training examples (``max |x_hat - x| <= 1e-4``). Under
  secure aggregation the coordinator holds masked inputs only; they are attacked as they are.
* ``membership`` — the loss-threshold attack on the final model (Yeom et al. 2018): the
  clients' training examples (members) against the task's test examples (non-members), as
  many of each; AUC and TPR at 1 % and 0.1 % FPR.

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

from ..config import load_config
from ..data.tasks import load_task
from ..errors import CheckpointError, ConfigError
from ..experiment import initial_params, make_dataset, resolve_config
from ..tree import Params
from .inversion import analytic_recovery, exact_recovery
from .membership import loss_threshold_scores, membership_auc, tpr_at_fpr
from .views import load_views

__all__ = ["AUDITS", "audit_run", "first_dense_layer"]

AUDITS = ("inversion", "membership")
"""The audits ``shoal audit`` runs on a finished run."""

TOL = 1e-4


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
    if paradigm != "federated":
        return {"skipped": f"paradigm {paradigm!r} has no coordinator receiving updates to "
                           "capture (the centralized baseline receives the raw data itself)"
                if paradigm == "centralized" else
                f"paradigm {paradigm!r}: capturing its views is not built yet"}
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


def _membership(run_dir: Path, paradigm: str, config: Any, task: Any, dataset: Any,
                model: Any) -> dict[str, Any]:
    path = run_dir / paradigm / "model.safetensors"
    if not path.exists():
        return {"skipped": f"{path} does not exist (the run did not finish)"}
    params = load_file(str(path))
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
    scores = loss_threshold_scores(model, params, (x, y), loss_fn=task.loss_fn)
    return {"attack": "loss threshold", "members": n, "non_members": n,
            "auc": membership_auc(scores, is_member),
            "tpr_at_1%_fpr": tpr_at_fpr(scores, is_member, 0.01),
            "tpr_at_0.1%_fpr": tpr_at_fpr(scores, is_member, 0.001)}


def audit_run(run_dir: str | Path, only: Sequence[str] = ()) -> dict[str, Any]:
    """Run the audits (``only``: a subset of :data:`AUDITS`) on every paradigm of the run in
    ``run_dir``; write and return ``{paradigm: {audit: figures}}``."""
    run_dir = Path(run_dir)
    unknown = sorted(set(only) - set(AUDITS))
    if unknown:
        raise ConfigError(f"audit: unknown audit(s) {unknown}; choose from {list(AUDITS)}.")
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"audit: {str(run_dir)!r} holds no config.toml; give the "
                              "directory of a run (`shoal run --out DIR`).")
    config = load_config(run_dir / "config.toml")
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
        out[paradigm] = entry
    tmp = run_dir / "audit.json.tmp"
    tmp.write_text(json.dumps(out, indent=1, default=lambda v: None if isinstance(
        v, float) and math.isnan(v) else v))
    tmp.replace(run_dir / "audit.json")
    return out
