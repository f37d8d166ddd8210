"""The ``shoal`` command: exit status and error text as a user sees them."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from shoal.config import load_config, to_dict


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True,
                          timeout=120, env={"COLUMNS": "200", "PATH": ""})


def test_config_prints_the_resolved_config_which_reads_back_the_same() -> None:
    proc = shoal("config", "--set", "secagg.enabled=true", "--set", "task.name=heart")
    assert proc.returncode == 0, proc.stderr
    data = tomllib.loads(proc.stdout)
    assert data["secagg"]["enabled"] is True and data["task"]["name"] == "heart"
    expected = load_config(None, ["secagg.enabled=true", "task.name=heart"])
    assert to_dict(load_config(None)) != to_dict(expected)
    # resolved as it would run: the task's partition filled in, and the default 10 clients per
    # round lowered to the 4 hospitals (and said so)
    assert data["data"]["partition"] == "natural" and data["federated"]["clients_per_round"] == 4
    expected.federated.clients_per_round = 4
    assert data == {**to_dict(expected), "data": {**to_dict(expected)["data"],
                                                  "partition": "natural"}}
    assert "federated.clients_per_round = 10 exceeds the 4 clients" in proc.stderr


def test_errors_print_their_full_text_with_status_2() -> None:
    proc = shoal("config", "--set", "secagg.enabld=true")
    assert proc.returncode == 2
    text = " ".join(proc.stderr.split())
    assert ("error: config: unknown field 'secagg.enabld'. Did you mean 'enabled'? Known fields "
            "in [secagg]: enabled, clip, max_weight, neighbours, threshold, max_mse.") in text


def test_run_verbose_logs_info_although_opacus_configured_logging_first(tmp_path):
    """`shoal run -v` shows INFO lines (opacus calls logging.basicConfig at import, which made
    the CLI's own basicConfig a no-op and -v silent)."""
    run = [sys.executable, "-m", "shoal", "run", "-q", "--set", "federated.rounds=1",
           "--set", "baseline=false", "--out", str(tmp_path / "r")]
    subprocess.run(run, check=True, capture_output=True, cwd=tmp_path)
    more = subprocess.run([sys.executable, "-m", "shoal", "run", "-v", "-q", "--resume",
                           str(tmp_path / "r"), "--set", "federated.rounds=2"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert "INFO shoal.experiment: federated: resuming after round 1" in more.stderr
