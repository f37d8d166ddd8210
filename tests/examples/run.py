"""Run an example script as a user would: a fresh interpreter, its own command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(script: str, *args: str, cwd: Path) -> str:
    """Run ``examples/<script>`` with ``args`` from ``cwd``; its stdout (it must succeed)."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def summary(run_dir: Path) -> list[dict[str, Any]]:
    """The results of a run directory's ``summary.json``, one entry per paradigm."""
    return json.loads((run_dir / "summary.json").read_text())["results"]


def variants(compare_dir: Path) -> dict[str, dict[str, Any]]:
    """A comparison directory's ``compare.json`` entries by variant name."""
    entries = json.loads((compare_dir / "compare.json").read_text())["variants"]
    return {v["name"]: v for v in entries}


def assert_report(path: Path, out: str) -> None:
    """The example printed the report's path last, and the file is a non-empty HTML page."""
    assert out.strip().splitlines()[-1] == f"report: {path}"
    text = path.read_text()
    assert text.lstrip().lower().startswith("<!doctype html") and "plotly" in text.lower()
