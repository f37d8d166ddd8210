"""Loading a run directory and a comparison directory, and the errors for bad ones."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from shoal.errors import CheckpointError
from shoal.report import FIGURES, load_report


def test_a_run_directory_loads_each_paradigm_with_its_figures_and_rounds(plain_run):
    data = load_report(plain_run)
    summary = json.loads((plain_run / "summary.json").read_text())
    assert data.kind == "run" and data.primary == "accuracy" and not data.lower_is_better
    assert [e.name for e in data.entries] == ["federated", "centralized"]
    assert data.baseline is data.entries[1]
    for entry, result in zip(data.entries, summary["results"], strict=True):
        assert set(entry.figures) == set(FIGURES)
        assert entry.figures["accuracy"] == result["final"]["accuracy"]
        assert entry.figures["bytes_total"] == result["bytes"]
        assert entry.figures["rounds"] == 3 and len(entry.history) == 3
        assert entry.figures["epsilon"] is None and entry.audit == {}
        clients = result["cost"]["clients"]
        assert entry.figures["bytes_per_participant"] == pytest.approx(
            clients["bytes_sent_mean"] + clients["bytes_received_mean"])
    fed, central = data.entries
    assert fed.figures["accuracy_worst_client"] == summary["results"][0]["final"][
        "fed_eval/accuracy_worst"]
    # the centralized baseline has no clients' own evaluation: the report's, from its model
    assert central.figures["accuracy_worst_client"] == min(central.clients.values())
    plain = load_report(plain_run, clients=False).entries[1]
    assert plain.figures["accuracy_worst_client"] is None  # not measured, not zero
    assert 'name = "digits"' in data.config_text


def test_each_clients_figure_is_recomputed_from_the_final_model(plain_run, tmp_path):
    fed, central = load_report(plain_run).entries
    # 6 clients, each the final model on its held-out data: the run's own federated
    # evaluation of the last round saw the same worst client
    assert len(fed.clients) == len(central.clients) == 6
    assert min(fed.clients.values()) == pytest.approx(fed.figures["accuracy_worst_client"])
    assert fed.clients_why == ""
    assert load_report(plain_run, clients=False).entries[0].clients == {}
    run = _copy(plain_run, tmp_path)
    (run / "federated" / "model.safetensors").unlink()
    fed, central = load_report(run).entries
    assert fed.clients == {} and fed.clients_why == (
        f"{run / 'federated' / 'model.safetensors'} is missing")
    assert len(central.clients) == 6


def test_a_dp_run_carries_its_epsilon_and_audits(dp_run):
    (fed,) = load_report(dp_run).entries
    privacy = json.loads((dp_run / "summary.json").read_text())["results"][0]["privacy"]
    assert fed.figures["epsilon"] == privacy["epsilon"] > 0
    assert fed.figures["protects"] == privacy["protects"]
    assert 0 <= fed.audit["membership"]["auc"] <= 1
    assert len(fed.audit["membership"]["roc"]["fpr"]) > 2


def test_a_comparison_directory_loads_its_variants_and_their_curves(comparison):
    data = load_report(comparison)
    assert data.kind == "comparison"
    assert [(e.name, e.paradigm, e.status) for e in data.entries] == [
        ("centralized", "centralized", "finished"), ("federated", "federated", "finished"),
        ("federated-dp", "federated", "finished"), ("split", "split", "pending"),
        ("swarm", "swarm", "failed"), ("split-u", "split", "skipped")]
    central, fed, dp, split, swarm, skipped = data.entries
    assert data.baseline is central
    assert len(central.history) == len(fed.history) == len(dp.history) == 3
    assert "central/accuracy" in fed.history[-1] and "dp/epsilon" in dp.history[-1]
    # compare.json carries the run's whole audit.json: the variant's paradigm's audits
    assert set(dp.audit) == {"membership"} and central.audit == {}
    assert swarm.reason == "RoundError: no peer replied" and skipped.status == "skipped"
    # a figure compare.json does not carry is not measured, never invented
    assert fed.figures["compute_s_per_participant"] is None
    assert split.history == [] and all(v is None for v in split.figures.values())
    assert swarm.figures["accuracy"] is None


def test_a_variant_without_audits_in_compare_json_reads_its_runs_audit_file(comparison,
                                                                           tmp_path):
    root = tmp_path / "cmp"
    shutil.copytree(comparison, root)
    spec = json.loads((root / "compare.json").read_text())
    spec["variants"][2]["figures"]["audit"] = None
    (root / "compare.json").write_text(json.dumps(spec))
    dp = load_report(root).entries[2]
    assert dp.audit["membership"]["auc"] == json.loads(
        (root / "dp" / "audit.json").read_text())["federated"]["membership"]["auc"]


def test_a_primary_figure_the_comparison_left_empty_is_read_from_the_variants_run(
        comparison, tmp_path):
    root = tmp_path / "cmp"
    shutil.copytree(comparison, root)
    spec = json.loads((root / "compare.json").read_text())
    del spec["variants"][1]["figures"]["accuracy"]  # as compare writes a regression's RMSE
    (root / "compare.json").write_text(json.dumps(spec))
    fed = load_report(root, clients=False).entries[1]
    summary = json.loads((root / "plain" / "summary.json").read_text())
    assert fed.figures["accuracy"] == summary["results"][0]["final"]["accuracy"]


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_a_directory_that_is_neither_says_what_it_expects(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; give the directory of a run"):
        load_report(tmp_path / "nowhere")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file; give the directory that holds"):
        load_report(tmp_path / "f.txt")
    with pytest.raises(CheckpointError, match="holds neither summary.json .* nor compare.json"):
        load_report(tmp_path)
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(CheckpointError, match=r"summary.json is missing: the run has not "
                                              r"finished. Rerun the run \(`shoal run --resume"):
        load_report(tmp_path)


def test_a_run_of_several_seeds_is_reported_seed_by_seed_with_its_spread(tmp_path, one_thread):
    """`shoal run --seeds 0,1`: every seed's paradigms, each read against its own seed's
    baseline, and each paradigm's spread across the seeds."""
    from shoal.config import load_config
    from shoal.report.html import render_report
    from shoal.report.reading import reading
    from shoal.seeds import run_seeds

    from .conftest import TINY

    summary = run_seeds(load_config(None, [*TINY, "federated.rounds=2"]), tmp_path,
                        seeds=[0, 1])
    data = load_report(tmp_path)
    assert data.kind == "seeds" and data.spread == summary["paradigms"]
    assert [e.name for e in data.entries] == ["federated (seed 0)", "centralized (seed 0)",
                                               "federated (seed 1)", "centralized (seed 1)"]
    fed1, cen1 = data.entries[2:]
    assert data.baseline_of(fed1) is cen1
    lines = reading(data)
    got, ref = fed1.figures["accuracy"], cen1.figures["accuracy"]
    assert any(line.startswith("federated (seed 1)") and f"{got:.3f} against {ref:.3f}" in line
               for line in lines), lines
    fw = summary["paradigms"]["federated"]["metrics"]["accuracy"]["final_window"]
    assert (f"Across 2 seeds, federated reaches accuracy {fw['mean']:.3f} ± {fw['std']:.3f} "
            f"(from {fw['min']:.3f} to {fw['max']:.3f})") in " ".join(lines)
    page = render_report(data)
    assert "run of several seeds" in page and "4 runs" in page


def test_a_broken_seeds_summary_says_what_to_do(tmp_path):
    (tmp_path / "seeds.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"seeds.json does not hold 'runs', each seed's "
                                              r"run directory by seed, .* `shoal report "
                                              r".*seed-0`"):
        load_report(tmp_path)


def test_corrupt_or_missing_files_are_named_with_the_fix(plain_run, tmp_path):
    run = _copy(plain_run, tmp_path)
    (run / "federated" / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2, "cen\n')
    with pytest.raises(CheckpointError) as e:
        load_report(run)
    assert str(e.value).startswith(f"shoal report: {run / 'federated' / 'metrics.jsonl'} "
                                   "line 2 is not valid JSON (")
    assert f"`shoal run --resume {run}`" in str(e.value)
    (run / "federated" / "metrics.jsonl").write_text("[1, 2]\n")
    with pytest.raises(CheckpointError, match="line 1 is a JSON list, expected an object"):
        load_report(run)
    (run / "federated" / "metrics.jsonl").unlink()
    with pytest.raises(CheckpointError, match=r"metrics.jsonl is missing. Rerun the run"):
        load_report(run)
    (run / "summary.json").write_text('{"config": {}, "results": [')
    with pytest.raises(CheckpointError, match=r"summary.json is not valid JSON \(Expecting "
                                              r"value at line 1, column 28\); it was perhaps "
                                              r"cut short"):
        load_report(run)
    (run / "summary.json").write_text('{"results": {}}')
    with pytest.raises(CheckpointError, match="does not hold a list 'results'"):
        load_report(run)


def test_a_corrupt_audit_file_says_to_rerun_the_audit(dp_run, tmp_path):
    run = _copy(dp_run, tmp_path)
    (run / "audit.json").write_text("{")
    with pytest.raises(CheckpointError, match=rf"audit.json is not valid JSON .* Rerun `shoal "
                                              rf"audit {run}` to rewrite it, or delete it"):
        load_report(run)


def test_a_bad_comparison_names_the_variant(comparison, tmp_path):
    root = tmp_path / "cmp"
    root.mkdir()
    (root / "compare.json").write_text('{"variants": 3}')
    with pytest.raises(CheckpointError, match="does not hold a list 'variants'"):
        load_report(root)
    (root / "compare.json").write_text(json.dumps({"variants": [
        {"name": "x", "status": "done"}]}))
    with pytest.raises(CheckpointError, match=r"variant 1 \('x'\) has status 'done'; expected "
                                              "one of finished, failed, skipped, pending"):
        load_report(root)
    (root / "compare.json").write_text(json.dumps({"variants": [
        {"name": "x", "paradigm": "federated", "run_dir": "gone", "status": "finished"}]}))
    with pytest.raises(CheckpointError, match=r"gone/federated/metrics.jsonl is missing. "
                                              r"Variant 'x' is marked finished, but its run "
                                              r"directory lacks it. Run `shoal compare --resume "):
        load_report(root)


def _shoal(monkeypatch, *args: str) -> int:
    """Run the ``shoal`` entry point in-process; its exit status."""
    from shoal.cli import main

    monkeypatch.setattr(sys, "argv", ["shoal", *args])
    with pytest.raises(SystemExit) as done:
        main()
    return int(done.value.code or 0)


def test_the_cli_prints_the_error_without_a_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "summary.json").write_text("{")
    assert _shoal(monkeypatch, "report", str(tmp_path)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    assert err.startswith(f"error: shoal report: {tmp_path / 'summary.json'} is not valid JSON")
    assert not (tmp_path / "report.html").exists()


def test_the_cli_writes_the_report_and_prints_the_reading(plain_run, tmp_path, monkeypatch,
                                                          capsys):
    out = tmp_path / "r.html"
    assert _shoal(monkeypatch, "report", str(plain_run), "--out", str(out)) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.startswith("centralized (the pooled-data baseline) reaches accuracy ")
    assert "federated costs " in printed or "federated gains " in printed
    assert printed.endswith(f"report written to {out}")
    assert out.stat().st_size > 1_000_000
