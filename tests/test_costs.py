"""Complete costs: every byte the run's messages carry is in its metrics and summary —
evaluation, secure aggregation's extra steps, the baseline's raw-data upload — and the
per-participant figures add up to the totals."""

from __future__ import annotations

import json

import pytest

from shoal.algorithms.centralized import UPLOAD
from shoal.config import load_config
from shoal.experiment import Built, run_experiment
from shoal.message import COORDINATOR
from shoal.observe import Recorder

FAST = ["federated.rounds=3", "client.epochs=1", "federated.clients_per_round=5",
        "evaluation.federated_every=1"]


def observed(config, tmp_path):
    """Run ``config``, recording every message of every paradigm with a Recorder."""
    seen: dict[str, Recorder] = {}

    def transport(paradigm: str, built: Built):
        seen[paradigm] = built.transport.observe(Recorder())
        return built.transport

    results = run_experiment(config, tmp_path, transport=transport)
    return {r.paradigm: r for r in results}, seen


def test_the_summary_counts_every_message_actually_sent_evaluation_included(tmp_path):
    results, seen = observed(load_config(None, FAST), tmp_path)
    fed, rec = results["federated"], seen["federated"]
    by_kind = {k: sum(s.nbytes for s in rec.seen if s.message.kind == k)
               for k in ("train", "evaluate")}
    cost = fed.cost["bytes"]
    assert by_kind["evaluate"] > 0
    assert cost["by_kind"] == by_kind
    assert cost["evaluation"] == by_kind["evaluate"]  # federated evaluation's traffic
    assert cost["total"] == fed.bytes == rec.nbytes()
    assert cost["down"] == sum(s.nbytes for s in rec.seen if s.message.src == COORDINATOR)
    assert cost["up"] == sum(s.nbytes for s in rec.seen if s.message.dst == COORDINATOR)
    # Per participant: the clients' sent bytes are the coordinator's received ones.
    assert fed.cost["clients"]["bytes_sent_total"] == cost["up"]
    assert fed.cost["coordinator"]["bytes_received"] == cost["up"]
    assert fed.cost["clients"]["count"] == 20
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["results"][0]["cost"]["bytes"]["evaluation"] == cost["evaluation"]
    table = json.loads((tmp_path / "federated" / "costs.json").read_text())["participants"]
    assert sum(r["bytes_sent"] for r in table.values()) == cost["total"]
    assert all(r["compute_s"] > 0 for n, r in table.items() if n != COORDINATOR)
    for h in fed.history:  # per round too
        assert h["comm/bytes_evaluation"] == h["comm/bytes/evaluate"] > 0


def test_the_baseline_reports_its_raw_data_upload(tmp_path):
    results, seen = observed(load_config(None, FAST), tmp_path)
    cen, rec = results["centralized"], seen["centralized"]
    uploads = [s for s in rec.seen if s.message.kind == UPLOAD and s.message.dst == COORDINATOR]
    assert len(uploads) == 20  # every client's training rows, once
    raw = sum(m.message.tensors["x"].nbytes + m.message.tensors["y"].nbytes for m in uploads)
    assert raw == sum(len(r.message.tensors["y"]) for r in uploads) * (64 * 4 + 8)  # digits
    assert cen.cost["bytes"]["up"] == sum(s.nbytes for s in uploads) > raw
    assert cen.bytes == rec.nbytes()
    assert cen.history[0]["centralized/uploaded_examples"] == sum(
        len(r.message.tensors["y"]) for r in uploads)
    assert all("comm/bytes/" + UPLOAD not in h for h in cen.history[1:])  # only in round 1


def test_secure_aggregation_counts_its_extra_steps(tmp_path):
    results, seen = observed(load_config(None, FAST + ["secagg.enabled=true",
                                                       "baseline=false"]), tmp_path)
    fed, rec = results["federated"], seen["federated"]
    kinds = fed.cost["bytes"]["by_kind"]
    assert set(kinds) == {"secagg.advertise", "secagg.share_keys", "secagg.masked_input", "secagg.consistency",
                          "secagg.unmask"}
    assert sum(kinds.values()) == fed.bytes == rec.nbytes()
    # Secure federated evaluation is a secure sum too: its share is counted as evaluation.
    assert 0 < fed.cost["bytes"]["evaluation"] < fed.bytes
    assert fed.history[0]["comm/bytes_evaluation"] > 0


def test_metric_prefixes_do_not_collide(tmp_path):
    results, _ = observed(load_config(None, FAST + ["privacy.mode=user",
                                                    "privacy.noise_multiplier=1.0",
                                                    "federated.weighting=uniform",
                                                    "privacy.accountant=rdp",
                                                    "baseline=false"]), tmp_path)
    h = results["federated"].history[-1]
    assert "dp/epsilon" in h
    assert not [k for k in h if k.startswith("dp/") and k not in (
        "dp/epsilon", "dp/delta", "dp/clip_norm", "dp/noise_std", "dp/below_clip_fraction")]


@pytest.mark.parametrize("executor", ["vectorized", "processes"])
def test_costs_are_the_same_whichever_executor_computes(tmp_path, executor):
    base, _ = observed(load_config(None, FAST + ["baseline=false"]), tmp_path / "seq")
    got, _ = observed(load_config(None, FAST + ["baseline=false", f"federated.executor={executor}",
                                                "federated.workers=2"]), tmp_path / "x")
    a, b = base["federated"].cost, got["federated"].cost
    assert a["bytes"]["down"] == b["bytes"]["down"]
    assert a["bytes"]["evaluation"] == pytest.approx(b["bytes"]["evaluation"], abs=200)
    assert a["clients"]["count"] == b["clients"]["count"]
    assert b["clients"]["compute_s_total"] > 0
