"""Every runnable example runs (on few rounds) and prints what it promises; the scenario
examples of the source documents have their tests in ``tests/examples/``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_quickstart_example() -> None:
    assert "accuracy on the sites' own held-out data" in _run("quickstart.py")
