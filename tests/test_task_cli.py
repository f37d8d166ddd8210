"""Tasks from the command line: one of the user's own ("module:factory", the example in
examples/own_task.py), the built-in C-MAPSS regression end to end, the primary metric named in
the config, and what ``shoal tasks`` states."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def shoal(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={"COLUMNS": "120", "PATH": ""})


def test_a_task_of_ones_own_runs_from_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = shoal("run", "configs/own_task.toml", "--set", "federated.rounds=2", "--out", str(out),
                 "-q", cwd=EXAMPLES)
    assert proc.returncode == 0, proc.stderr
    final = {r["paradigm"]: r["final"] for r in
             json.loads((out / "summary.json").read_text())["results"]}
    fed = final["federated"]
    assert {"rmse", "mae", "mape", "fed_eval/mape_worst", "fed_eval/mape_p90"} <= set(fed)
    assert "accuracy" not in fed and "fed_eval/mape_p10" not in fed
    assert fed["fed_eval/mape_worst"] >= fed["fed_eval/mape_p90"]  # an error: worst = highest
    text = " ".join(proc.stdout.split())
    assert "mape of the worst client (the highest) and the 90th percentile" in text


def test_cmapss_regression_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = shoal("run", "--set", "task.name=cmapss", "--set", "federated.rounds=1",
                 "--set", "client.epochs=1", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "paradigm" in line)
    assert header.split()[:5] == ["paradigm", "RMSE", "MAE", "worst", "p90"]
    fed = json.loads((out / "summary.json").read_text())["results"][0]["final"]
    assert fed["fed_eval/rmse_worst"] >= fed["fed_eval/rmse_p90"] > 0 and fed["rmse"] > 0


def test_a_primary_metric_the_task_lacks_is_refused(tmp_path: Path) -> None:
    proc = shoal("run", "--set", "task.name=cmapss", "--set", "evaluation.primary=accuracy",
                 "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert ("error: config field 'evaluation.primary': 'accuracy' is not a metric of task "
            "'cmapss'; expected one of loss, rmse, mae, mse (a regression task). A metric of "
            "your own goes into your task's Task(metrics={name: fn}), run with task.name = "
            "\"package.module:factory\".") in " ".join(proc.stderr.split())


def test_tasks_lists_kinds_metrics_and_preprocessing() -> None:
    proc = shoal("tasks")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "cmapss regression: rmse (primary), loss, mae, mse" in text
    assert "heart binary: accuracy (primary), loss, f1, auc" in text
    assert "standardised with mean 0.2860 and std 0.3530" in text
    assert 'task.name = "package.module:factory"' in text
