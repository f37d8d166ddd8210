"""Every runnable example runs (on few rounds) and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_hospitals_example() -> None:
    out = _run("hospitals.py", "--rounds", "2")
    for hospital in ("cleveland", "hungary", "switzerland", "va"):
        assert f"{hospital:<12} on its own test patients: accuracy" in out
    assert "pooled-data baseline: accuracy" in out


@pytest.mark.slow
def test_factories_example() -> None:
    out = _run("factories.py", "--rounds", "1")
    assert out.count("federated vs centralized:") == 2 and "ROC AUC" in out


def test_quickstart_example() -> None:
    assert "accuracy on the sites' own held-out data" in _run("quickstart.py")


def test_keyboard_example() -> None:
    out = _run("keyboard.py", "--rounds", "2", "--phones", "20", "--per-round", "5")
    assert "next-character accuracy on held-out roles" in out and "worst phone" in out


def test_clinics_swarm_example() -> None:
    out = _run("clinics_swarm.py", "--rounds", "2")
    for row in ("swarm (4 peers, ledger)", "FedAvg (coordinator)", "centralized (pooled data)",
                "cleveland alone", "va alone"):
        assert row in out
