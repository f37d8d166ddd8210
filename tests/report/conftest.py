"""Real tiny runs (digits, 3 rounds) and a comparison directory built from them, shared by
the report's tests: a plain federated run with its centralized baseline and federated
evaluation, and a federated run with DP-SGD and a membership audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.audits.membership import roc
from shoal.config import load_config
from shoal.experiment import run_experiment
from shoal.report.read import run_figures

TINY = ["federated.rounds=3", "client.epochs=1", "federated.clients_per_round=3",
        "task.hidden=16", "data.num_clients=6", "evaluation.federated_every=1",
        "checkpoint.keep=1"]
DP = [*TINY, "baseline=false", "privacy.mode=sample", "privacy.noise_multiplier=1.0",
      'audit.run=["membership"]']


def _add_roc(run_dir: Path) -> None:
    """Give each membership audit a ROC curve (``roc: {fpr, tpr}``) if the audit did not
    record one, from scores drawn around its AUC: the format `shoal audit` writes it in."""
    path = run_dir / "audit.json"
    audits = json.loads(path.read_text())
    rng = np.random.default_rng(0)
    for figures in audits.values():
        membership = figures.get("membership", {})
        if "auc" in membership and "roc" not in membership:
            scores = np.concatenate([rng.normal(0.3, 1, 200), rng.normal(0, 1, 200)])
            fpr, tpr, _ = roc(scores, np.r_[np.ones(200), np.zeros(200)])
            membership["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    path.write_text(json.dumps(audits, indent=1))


def _figures(run_dir: Path, paradigm: str, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    (result,) = [r for r in summary["results"] if r["paradigm"] == paradigm]
    figures = run_figures(result, "accuracy")
    for k in drop:
        del figures[k]
    audit = run_dir / "audit.json"  # `shoal compare` copies the run's whole audit.json
    return {**figures, "audit": json.loads(audit.read_text()) if audit.exists() else None}


@pytest.fixture(scope="session")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A comparison directory as `shoal compare` writes it: three finished variants (from two
    real runs, ``plain`` and ``dp``), one pending, one failed and one skipped."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("comparison")
        run_experiment(load_config(None, TINY), root / "plain")
        run_experiment(load_config(None, DP), root / "dp")
    finally:
        torch.set_num_threads(threads)
    _add_roc(root / "dp")
    variants = [
        {"name": "centralized", "paradigm": "centralized", "run_dir": "plain",
         "status": "finished", "figures": _figures(root / "plain", "centralized")},
        {"name": "federated", "paradigm": "federated", "run_dir": "plain",
         "status": "finished",
         "figures": _figures(root / "plain", "federated", drop=("compute_s_per_participant",))},
        {"name": "federated-dp", "paradigm": "federated", "run_dir": "dp",
         "status": "finished", "figures": _figures(root / "dp", "federated")},
        {"name": "split", "paradigm": "split", "run_dir": "split", "status": "pending",
         "figures": {}},
        {"name": "swarm", "paradigm": "swarm", "run_dir": "swarm", "status": "failed",
         "reason": "RoundError: no peer replied", "figures": {"accuracy": None}},
        {"name": "split-u", "paradigm": "split", "run_dir": "split-u", "status": "skipped",
         "reason": "the model cannot be cut twice", "figures": {}},
    ]
    config = json.loads((root / "plain" / "summary.json").read_text())["config"]
    (root / "compare.json").write_text(json.dumps({"config": config, "variants": variants},
                                                  indent=1))
    return root


@pytest.fixture(scope="session")
def plain_run(comparison: Path) -> Path:
    """A run directory: federated (with federated evaluation) and its centralized baseline."""
    return comparison / "plain"


@pytest.fixture(scope="session")
def dp_run(comparison: Path) -> Path:
    """A run directory: federated with DP-SGD (ε per round) and a membership audit."""
    return comparison / "dp"
