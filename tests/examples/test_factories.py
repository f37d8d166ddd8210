"""examples/factories.py: federated remaining-useful-life regression on NASA C-MAPSS, one
company = a fleet of engines, against each company trained alone; ends in its report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .run import EXAMPLES, assert_report, run_example, summary


def _rmse(out: str) -> dict[str, float]:
    """The printed table: ``{row label: RMSE}``."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^  (\S.*?)\s{2,}(\d+\.\d\d)", out, re.M)}


def test_fleets_deal_whole_engines_to_companies() -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from factories import fleets

    task = fleets(companies=3)
    assert task.groups is not None and sorted(set(task.groups)) == [
        "company-1", "company-2", "company-3"]
    from shoal.data.tasks import load_task
    engines = load_task("cmapss").groups
    assert engines is not None
    for engine in np.unique(engines):  # an engine's windows all belong to one company
        assert len(set(task.groups[engines == engine])) == 1
    alone = fleets(companies=3, company="company-2")
    assert set(alone.groups) == {"company-2"}
    assert len(alone.train) == int((task.groups == "company-2").sum())
    assert len(alone.test) == len(task.test) == 100


def test_factories_smoke(tmp_path: Path) -> None:
    out = run_example("factories.py", "--rounds", "1", "--companies", "2", "--out", "m",
                      cwd=tmp_path)
    run = tmp_path / "m"
    fed, central = summary(run / "federated")
    assert (fed["paradigm"], central["paradigm"]) == ("federated", "centralized")
    rmse = _rmse(out)
    assert rmse["federated"] == round(fed["final"]["rmse"], 2)
    for c in ("company-1", "company-2"):
        (alone,) = summary(run / "alone" / c)
        assert rmse[f"{c} alone"] == round(alone["final"]["rmse"], 2)
    assert re.search(r"federated RMSE [\d.]+ (beats|does NOT beat) the best single", out)
    assert_report(run / "federated" / "report.html", out)
    # a second run refuses the first's directory, and replaces it only when told to
    again = subprocess.run([sys.executable, str(EXAMPLES / "factories.py"), "--rounds", "1",
                            "--out", "m"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert again.returncode == 1 and "pass --overwrite to replace it" in again.stderr
    out = run_example("factories.py", "--rounds", "1", "--companies", "3", "--out", "m",
                      "--overwrite", cwd=tmp_path)
    assert "company-3 alone" in out
    assert sorted(p.name for p in (run / "alone").iterdir()) == [
        "company-1", "company-2", "company-3"]


def test_factories_refuses_a_directory_that_is_not_its_own_run(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "factories.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "holds files that are not an earlier run of this example" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_federated_beats_the_best_single_company(tmp_path: Path) -> None:
    out = run_example("factories.py", "--rounds", "10", "--out", "m", cwd=tmp_path)
    rmse = _rmse(out)
    alone = [v for k, v in rmse.items() if k.endswith("alone")]
    assert len(alone) == 5
    assert rmse["federated"] < min(alone)
    assert "beats the best single company's own model" in out
