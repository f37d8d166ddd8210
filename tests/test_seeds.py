"""Several seeds of one job: a run directory per seed, and a summary whose spread is computed
from the per-seed figures; the headline is the mean of the last evaluations, not one round."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.experiment import ParadigmResult
from shoal.seeds import final_window, parse_seeds, run_seeds, seeds_summary, seeds_table, spread


def test_final_window_is_the_mean_of_the_last_k_evaluations():
    # central evaluation every 2 rounds plus the last: rounds without it are skipped
    history = [{"round": r, **({"central/accuracy": 0.1 * r} if r % 2 == 0 or r == 9 else {})}
               for r in range(1, 10)]
    evaluated = [0.2, 0.4, 0.6, 0.8, 0.9]
    assert final_window(history, "central/accuracy", 3) == pytest.approx(
        statistics.fmean(evaluated[-3:]))
    assert final_window(history, "central/accuracy", 5) == pytest.approx(
        statistics.fmean(evaluated))
    # fewer evaluations than the window: all of them; none: NaN
    assert final_window(history, "central/accuracy", 50) == pytest.approx(
        statistics.fmean(evaluated))
    assert math.isnan(final_window(history, "central/loss"))
    with pytest.raises(ConfigError, match="window must be >= 1"):
        final_window(history, "central/accuracy", 0)


def test_spread_uses_the_sample_standard_deviation():
    s = spread([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2)
    assert (s["min"], s["max"], s["per_seed"]) == (0.5, 0.9, [0.5, 0.7, 0.9])
    assert spread([0.5])["std"] is None  # no spread from one seed


def test_an_error_metric_is_best_at_its_lowest_and_the_table_shows_the_primary():
    def result(rmse):
        history = [{"round": r + 1, "central/rmse": v, "central/loss": v * v}
                   for r, v in enumerate(rmse)]
        return [ParadigmResult("federated", len(rmse), {}, 10.0, 100.0, 1.0, history=history)]

    runs = {0: result([9.0, 5.0, 6.0]), 1: result([8.0, 4.0, 7.0, 3.0])}
    summary = seeds_summary(runs, load_config(None), window=2, primary="rmse")
    rmse = summary["paradigms"]["federated"]["metrics"]["rmse"]
    assert rmse["better"] == "lower"
    assert rmse["best"]["per_seed"] == [5.0, 3.0]
    assert rmse["final_window"]["per_seed"] == [5.5, 5.0]
    assert rmse["last"]["per_seed"] == [6.0, 3.0]
    assert summary["paradigms"]["federated"]["rounds"]["per_seed"] == [3.0, 4.0]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(seeds_table(summary))
    text = console.export_text()
    assert "rmse (last 2)" in text and "5.2500 ± 0.3536" in text and "4.0000 ± 1.4142" in text


def test_seeds_are_parsed_and_checked():
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"'x' is not one"):
        parse_seeds("0,x")
    with pytest.raises(ConfigError, match="seed 1 is given more than once"):
        parse_seeds("1,2,1")
    with pytest.raises(ConfigError, match=r"config field 'seeds\[1\]': expected a value >= 0"):
        load_config(None, ["seeds=[1, -1]"])
    with pytest.raises(ConfigError, match="seed 3 is given more than once"):
        run_seeds(load_config(None, ["seeds=[3, 3]"]), "unused")


def test_two_seeds_make_two_run_dirs_and_a_summary_of_their_spread(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "shoal", "run", "--seeds", "0,1", "--out", str(out), "-q",
         "--set", "federated.rounds=6", "--set", "client.epochs=1",
         "--set", "client.max_steps=2", "--set", "federated.clients_per_round=3"],
        capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    # each seed is a normal run directory, with its seed in its config
    for seed in (0, 1):
        d = out / f"seed-{seed}"
        assert load_config(d / "config.toml").seed == seed
        assert (d / "summary.json").exists() and (d / "federated" / "model.safetensors").exists()
    assert load_config(out / "config.toml").seeds == [0, 1]
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["window"] == 5
    for paradigm in ("federated", "centralized"):
        accs, lasts, bests = [], [], []
        for seed in (0, 1):
            d = out / f"seed-{seed}"
            lines = (d / paradigm / "metrics.jsonl").read_text().splitlines()
            evaluated = [json.loads(x)["central/accuracy"] for x in lines]
            assert len(evaluated) == 6
            accs.append(statistics.fmean(evaluated[-5:]))
            bests.append(max(evaluated))
            per_seed = json.loads((d / "summary.json").read_text())["results"]
            lasts.append(next(r for r in per_seed if r["paradigm"] == paradigm)
                         ["final"]["accuracy"])
        figures = summary["paradigms"][paradigm]["metrics"]["accuracy"]
        fw = figures["final_window"]
        assert fw["per_seed"] == pytest.approx(accs)
        assert fw["mean"] == pytest.approx(statistics.fmean(accs))
        assert fw["std"] == pytest.approx(statistics.stdev(accs))
        assert (fw["min"], fw["max"]) == pytest.approx((min(accs), max(accs)))
        assert figures["last"]["per_seed"] == pytest.approx(lasts)
        assert figures["last"]["std"] == pytest.approx(statistics.stdev(lasts))
        assert figures["best"]["mean"] == pytest.approx(statistics.fmean(bests))
        assert accs[0] != accs[1]  # the seeds differ
        # the table names its headline and shows the mean ± std of each paradigm
        row = next(line for line in proc.stdout.splitlines() if line.strip().startswith(paradigm))
        assert f"{fw['mean']:.4f} ± {fw['std']:.4f}" in row
    assert "accuracy (last 5)" in proc.stdout
    assert "the mean of the last 5 evaluations of each seed" in " ".join(proc.stdout.split())


def test_an_interrupted_multi_seed_run_resumes_to_the_same_summary(tmp_path):
    config = load_config(None, ["seeds=[0, 1]", "federated.rounds=3", "client.epochs=1",
                                "client.max_steps=2", "federated.clients_per_round=3",
                                "baseline=false"])
    full = run_seeds(config, tmp_path / "full")

    class Interrupt:
        def after_round(self, ctx, report):
            if report.round == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # seed 0 finishes, seed 1 stops in round 2
        run_seeds(config, tmp_path / "cut",
                  callbacks=lambda seed, p, r: [Interrupt()] if seed == 1 else [])
    assert not (tmp_path / "cut" / "seeds.json").exists()
    resumed = run_seeds(load_config(tmp_path / "cut" / "config.toml"), tmp_path / "cut",
                        resume=True)
    for figure in ("final_window", "best", "last"):
        a = full["paradigms"]["federated"]["metrics"]["accuracy"][figure]
        b = resumed["paradigms"]["federated"]["metrics"]["accuracy"][figure]
        assert a == b, figure
