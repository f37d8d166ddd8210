"""examples/keyboard.py: plain FedAvg against FedAvg with distributed DP inside secure
aggregation, on Shakespeare roles as phones; ends in the comparison's report."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from .run import assert_report, run_example, summary, variants


def test_keyboard_compares_plain_fedavg_with_dp_and_secagg(tmp_path: Path) -> None:
    out = run_example("keyboard.py", "--rounds", "2", "--phones", "20", "--test-roles", "10",
                      "--epsilon", "5", "--out", "kb", cwd=tmp_path)
    run = tmp_path / "kb"
    found = variants(run)
    assert set(found) == {"federated", "federated-ddp"}
    assert all(v["status"] == "finished" for v in found.values())
    private = tomllib.loads((run / "federated-ddp" / "config.toml").read_text())
    assert private["privacy"]["mode"] == "distributed" and private["secagg"]["enabled"]
    assert private["privacy"]["target_epsilon"] == 5.0
    plain = tomllib.loads((run / "federated" / "config.toml").read_text())
    assert plain["privacy"]["mode"] == "off" and not plain["secagg"]["enabled"]
    for name in found:  # ordinary run directories: the report and `shoal report` read them
        (entry,) = summary(run / name)
        assert entry["paradigm"] == "federated" and entry["rounds"] == 2
        assert (run / name / "federated" / "metrics.jsonl").is_file()
        # the comparison judges next-character accuracy (not the sequence kind's perplexity)
        assert found[name]["figures"]["accuracy"] == entry["final"]["accuracy"]
        assert 0 < found[name]["figures"]["accuracy_worst_client"] <= 1
    eps = found["federated-ddp"]["figures"]["epsilon"]
    assert 4.5 < eps <= 5.0  # the budget is spent, not exceeded
    assert found["federated"]["figures"]["epsilon"] is None
    line = re.search(r"FedAvg \+ DP \+ SecAgg\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out)
    assert line and abs(float(line[4]) - eps) < 0.01
    assert float(line[1]) == round(found["federated-ddp"]["figures"]["accuracy"], 4)
    assert f"distributed DP (ε = {eps:.2f}" in out and "points of next-character" in out
    assert_report(run / "report.html", out)
