"""``shoal compare``: variant overrides, the equal budget, early stopping on the held-out set,
compare.json's schema, resume, refusals and failures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from shoal import experiment
from shoal.callbacks import read_metrics
from shoal.compare import (
    DEFAULT_EPSILON,
    FIGURES,
    VARIANTS,
    base_config,
    compare,
    planned_examples,
    variant_overrides,
)
from shoal.config import apply_overrides, parse_config, to_dict
from shoal.data.tasks import load_task
from shoal.errors import CheckpointError, ConfigError
from shoal.experiment import initial_params, make_dataset, resolve_config
from shoal.holdout import carve_validation
from shoal.metrics import Evaluator

from ._configs import tiny


def setting(config, key: str):
    section, field = key.split(".")
    return getattr(getattr(config, section), field)


@pytest.fixture(scope="module")
def prepared():
    base = base_config(tiny())
    task = load_task("digits")
    base = resolve_config(base, task, quiet=True)
    return base, task, make_dataset(base, task)


def variant_config(base, overrides):
    return parse_config(apply_overrides(to_dict(base), overrides))


EXPECTED = {  # variant -> (paradigm, privacy.mode, secagg.enabled, split.schedule)
    "centralized": ("centralized", "off", False, None),
    "data_parallel": ("data_parallel", "off", False, None),
    "federated": ("federated", "off", False, None),
    "federated-dp": ("federated", "sample", False, None),
    "federated-secagg": ("federated", "off", True, None),
    "federated-dp-secagg": ("federated", "sample", True, None),
    "federated-ddp": ("federated", "distributed", True, None),
    "split": ("split", "off", False, "vanilla"),
    "split-ushaped": ("split", "off", False, "vanilla"),
    "splitfed": ("split", "off", False, "splitfed"),
    "swarm": ("swarm", "off", False, None),
}


def test_every_variant_is_selected_by_its_overrides(prepared):
    base, task, dataset = prepared
    assert list(VARIANTS) == list(EXPECTED)
    for name, (paradigm, mode, secagg, schedule) in EXPECTED.items():
        overrides, _ = variant_overrides(VARIANTS[name], base, task, dataset)
        cfg = variant_config(base, overrides)
        assert (cfg.paradigm, cfg.privacy.mode, cfg.secagg.enabled) == (paradigm, mode, secagg)
        assert cfg.baseline is False, name
        if schedule is not None:
            assert cfg.split.schedule == schedule, name
        if VARIANTS[name].dp:  # the config states no ε, so the documented default
            assert cfg.privacy.target_epsilon == DEFAULT_EPSILON
        else:
            assert cfg.privacy.target_epsilon == 0
    # U-shaped keeps the labels on the client; the others keep the base's (no head cut)
    ushaped, _ = variant_overrides(VARIANTS["split-ushaped"], base, task, dataset)
    assert "split.labels=client" in ushaped
    assert 'split.head_cut=""' in variant_overrides(VARIANTS["split"], base, task, dataset)[0]


def test_dp_variants_use_the_epsilon_the_config_states(prepared):
    _, task, dataset = prepared
    base = resolve_config(base_config(tiny("privacy.target_epsilon=8.0")), task, quiet=True)
    for name in ("federated-dp", "federated-dp-secagg", "federated-ddp"):
        overrides, _ = variant_overrides(VARIANTS[name], base, task, dataset)
        assert not any(o.startswith("privacy.target_epsilon") for o in overrides)
        assert variant_config(base, overrides).privacy.target_epsilon == 8.0


def test_every_variant_gets_the_same_examples_budget(prepared):
    base, task, dataset = prepared
    budget = planned_examples(base, dataset)
    per_round = {}
    for v in VARIANTS.values():
        overrides, _ = variant_overrides(v, base, task, dataset)
        cfg = variant_config(base, overrides)
        per_round[v.name] = planned_examples(cfg, dataset) / cfg.federated.rounds
        # within half a round (swarm's rounds) or half a global batch per round (data-parallel)
        slack = max(per_round[v.name] / 2,
                    cfg.federated.rounds * cfg.data_parallel.workers * cfg.client.batch_size / 2)
        assert abs(planned_examples(cfg, dataset) - budget) <= slack, v.name
    assert per_round["swarm"] > per_round["federated"]  # every peer trains every round...
    swarm = variant_config(base, variant_overrides(VARIANTS["swarm"], base, task, dataset)[0])
    assert swarm.federated.rounds < base.federated.rounds  # ... so it gets fewer rounds


def test_the_validation_set_is_carved_from_training_not_the_test_set():
    cfg = tiny("evaluation.validation_fraction=0.1")
    task = load_task("digits")
    rest, validation = carve_validation(cfg, task)
    assert validation is not None and len(validation) == round(0.1 * len(task.train))
    held = set(validation.index.tolist())
    dataset = make_dataset(resolve_config(cfg, task, quiet=True), task)
    dealt = set()
    for cid in dataset.client_ids():
        c = dataset.client(cid)
        dealt |= set(c.train.index.tolist()) | set(c.eval.index.tolist())
    assert not held & dealt  # no client trains (or evaluates) on a validation row
    assert held | dealt == set(task.train.index.tolist())
    assert validation.x is task.train.x  # rows of the training pool; the test set is untouched
    assert rest.test is task.test


def test_patience_needs_a_validation_set():
    with pytest.raises(ConfigError, match="evaluation.validation_fraction = 0"):
        tiny("evaluation.patience=3")


def test_early_stopping_decides_on_the_held_out_set(tmp_path):
    # min_delta = 1: no round can improve accuracy by more than 1, so patience 1 stops after 2
    cfg = tiny("evaluation.validation_fraction=0.2", "evaluation.patience=1",
               "evaluation.min_delta=1.0", "federated.rounds=5")
    results = compare(cfg, tmp_path / "c", only=["federated"])
    (r,) = results
    assert r.status == "finished"
    assert r.figures["rounds"] == 2 and "val/accuracy" in r.figures["stopped"]
    assert "held-out validation set" in r.figures["stopped"]
    history = read_metrics(tmp_path / "c" / "federated" / "federated" / "metrics.jsonl")
    assert all("val/accuracy" in h for h in history)
    # val/accuracy is the final model on the carved validation rows, not on the test set
    run_cfg = parse_config(json.loads((tmp_path / "c" / "compare.json").read_text())["config"])
    task = load_task("digits")
    _, validation = carve_validation(run_cfg, task)
    model, _ = initial_params(run_cfg, task)
    params = load_file(str(tmp_path / "c" / "federated" / "federated" / "model.safetensors"))
    evaluator = Evaluator.for_task(task, model)
    assert history[-1]["val/accuracy"] == pytest.approx(evaluator(params, validation)["accuracy"])
    assert history[-1]["central/accuracy"] == pytest.approx(
        evaluator(params, task.test)["accuracy"])


def test_compare_json_schema_and_skipped_variants(tmp_path):
    out = tmp_path / "c"
    results = compare(tiny(), out, only=["centralized", "federated", "split-ushaped"])
    data = json.loads((out / "compare.json").read_text())
    assert set(data) == {"config", "variants"}
    assert data["config"]["baseline"] is False and data["config"]["paradigm"] == "federated"
    assert [v["name"] for v in data["variants"]] == ["centralized", "federated", "split-ushaped"]
    for v in data["variants"]:
        assert set(v) == {"name", "paradigm", "run_dir", "overrides", "status", "reason",
                          "figures"}
        assert set(v["figures"]) == set(FIGURES)
        assert v["run_dir"] == v["name"]
    central, fed, ushaped = data["variants"]
    for v in (central, fed):
        f = v["figures"]
        assert v["status"] == "finished" and v["reason"] is None
        assert (out / v["run_dir"] / "summary.json").exists()  # an ordinary run directory
        assert 0 <= f["accuracy_worst_client"] <= f["accuracy_p10"] <= 1
        for k in ("accuracy", "bytes_per_participant", "bytes_total", "seconds",
                  "compute_s_per_participant", "examples"):
            assert isinstance(f[k], float) and f[k] > 0, k
        assert f["rounds"] == 3 and f["epsilon"] is None and f["audit"] is None
        assert isinstance(f["protects"], str)
    summary = json.loads((out / "federated" / "summary.json").read_text())["results"][0]
    assert fed["figures"]["bytes_total"] == summary["bytes"]
    assert fed["figures"]["accuracy"] == summary["final"]["accuracy"]
    assert "only the sum" not in fed["figures"]["protects"]
    # digits' MLP has no layer between the default cut and its last layer: skipped, with why
    assert ushaped["status"] == "skipped" and "head cut" in ushaped["reason"]
    assert all(x is None for x in ushaped["figures"].values())
    assert results[2].status == "skipped"


def test_a_new_comparison_refuses_a_directory_that_holds_files(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already holds files"):
        compare(tiny(), tmp_path / "c", only=["federated"])
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_unknown_variant_names_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown variant 'fedavg'.*centralized, data_parallel, "
                                          "federated, federated-dp"):
        compare(tiny(), tmp_path / "c", only=["federated", "fedavg"])
    assert not (tmp_path / "c").exists()


def test_cli_only_with_an_unknown_name(tmp_path):
    from typer.testing import CliRunner

    from shoal.cli import app

    result = CliRunner().invoke(app, ["compare", "--only", "federated,nope", "--out",
                                      str(tmp_path / "c")])
    assert isinstance(result.exception, ConfigError)
    assert f"unknown variant 'nope'; the variants are: {', '.join(VARIANTS)}." in str(
        result.exception)
    assert not (tmp_path / "c").exists()


@pytest.mark.slow  # a fresh interpreter: ~20 s on a busy 2-core machine
def test_cli_only_with_an_unknown_name_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "shoal", "compare", "--only", "federated,nope",
                        "--out", str(tmp_path / "c")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    err = " ".join(p.stderr.split())
    assert "unknown variant 'nope'" in err
    assert ", ".join(VARIANTS) in err


def test_a_failing_variant_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    def broken(setup):
        raise RuntimeError("the swarm's ledger is on fire")

    monkeypatch.setitem(experiment.PARADIGMS, "swarm", broken)
    results = compare(tiny(), tmp_path / "c", only=["federated", "swarm"])
    assert [r.status for r in results] == ["finished", "failed"]
    assert results[1].reason == "RuntimeError: the swarm's ledger is on fire"
    entry = json.loads((tmp_path / "c" / "compare.json").read_text())["variants"][1]
    assert entry["status"] == "failed" and "on fire" in entry["reason"]


class Interrupt:
    """Stops the run with Ctrl-C after ``round`` of the named paradigm."""

    def __init__(self, round: int):
        self.round = round

    def after_round(self, ctx, report):
        if report.round == self.round:
            raise KeyboardInterrupt


def test_resume_keeps_finished_variants_and_continues_the_interrupted_one(tmp_path):
    out = tmp_path / "c"
    cfg = tiny()

    def interrupt(variant, paradigm, rounds):
        return [Interrupt(2)] if variant == "federated" else []

    with pytest.raises(KeyboardInterrupt):
        compare(cfg, out, only=["centralized", "federated", "splitfed"], callbacks=interrupt)
    data = json.loads((out / "compare.json").read_text())
    assert [v["status"] for v in data["variants"]] == ["finished", "pending", "pending"]
    assert data["variants"][2]["figures"] == dict.fromkeys(FIGURES)  # pending: all null
    kept = data["variants"][0]
    mtime = (out / "centralized" / "summary.json").stat().st_mtime_ns

    results = compare(None, out, resume=True)
    assert [r.status for r in results] == ["finished"] * 3
    assert results[0].figures == kept["figures"]  # not run again
    assert (out / "centralized" / "summary.json").stat().st_mtime_ns == mtime
    rounds = [h["round"] for h in read_metrics(out / "federated" / "federated" / "metrics.jsonl")]
    assert rounds == [1, 2, 3]  # resumed after round 2, every round once

    # the same as an uninterrupted run
    fresh = compare(cfg, tmp_path / "fresh", only=["federated"])
    a = load_file(str(out / "federated" / "federated" / "model.safetensors"))
    b = load_file(str(tmp_path / "fresh" / "federated" / "federated" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh[0].figures["accuracy"] == results[1].figures["accuracy"]


def test_resume_refuses_another_variant_list(tmp_path):
    compare(tiny(), tmp_path / "c", only=["centralized"])
    with pytest.raises(ConfigError, match="without --only"):
        compare(None, tmp_path / "c", only=["federated"], resume=True)
    with pytest.raises(ConfigError, match="different config"):
        compare(tiny("seed=3"), tmp_path / "c", resume=True)


def test_resume_needs_a_comparison(tmp_path):
    with pytest.raises(Exception, match="not a comparison directory"):
        compare(None, tmp_path, resume=True)


def test_audit_figures_where_they_ran(tmp_path):
    results = compare(tiny('audit.run=["membership"]'), tmp_path / "c", only=["federated"])
    audit = results[0].figures["audit"]
    assert audit == json.loads((tmp_path / "c" / "federated" / "audit.json").read_text())
    assert 0 <= audit["federated"]["membership"]["auc"] <= 1


def test_the_comparison_report_renders_in_a_browser(tmp_path, browser):
    from selenium.webdriver.common.by import By

    from shoal.compare import write_compare_report

    compare(tiny(), tmp_path / "c", only=["centralized", "federated", "split-ushaped"])
    from selenium.webdriver.support.ui import WebDriverWait

    report = write_compare_report(tmp_path / "c")
    assert report == tmp_path / "c" / "report.html"
    browser.get(report.as_uri())

    def drawn(driver):
        plots = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
        return plots and all(p.find_elements(By.CSS_SELECTOR, ".main-svg") for p in plots)

    assert WebDriverWait(browser, 30).until(drawn)
    assert "split-ushaped" in browser.page_source  # the skipped variant is shown, not dropped


def test_the_validation_set_holds_whole_units_of_near_copies():
    import dataclasses

    import numpy as np

    task = load_task("digits")
    units = np.arange(len(task.train)) // 7  # e.g. tracks of 7 photos of one sign
    task = dataclasses.replace(task, units=units)
    rest, validation = carve_validation(tiny("evaluation.validation_fraction=0.2"), task)
    positions = np.searchsorted(task.train.index.numpy(), validation.index.numpy())
    held = set(units[positions].tolist())
    kept = set(rest.units.tolist())
    assert held and kept and not held & kept  # no unit on both sides
    assert len(validation) >= round(0.2 * len(task.train))
    assert len(validation) + len(rest.train) == len(task.train)
