"""examples/traffic_signs.py: split learning in cars (the camera-side layers stay in the car)
beside centralized training on GTSRB; ends in its report. Reads the GTSRB files from
``../shared/data/gtsrb`` beside the repository (skipped, saying so, where they are absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .run import EXAMPLES, assert_report, run_example, summary

DATA = EXAMPLES.parents[1] / "shared" / "data" / "gtsrb"


@pytest.mark.slow  # about 30 s of CPU: two loads of the data, two paradigms, the report
@pytest.mark.skipif(not (DATA / "gtsrb32_train.npz").is_file(),
                    reason=f"the GTSRB files are not in {DATA} (../shared/data/gtsrb beside the "
                           "repository, where the CI checkout has them)")
def test_traffic_signs_runs_split_beside_centralized(tmp_path: Path) -> None:
    out = run_example("traffic_signs.py", "--rounds", "2", "--cars", "6", "--per-round", "2",
                      "--max-steps", "3", "--data-dir", str(DATA), "--out", "ts", cwd=tmp_path)
    run = tmp_path / "ts"
    results = {r["paradigm"]: r for r in summary(run)}
    assert set(results) == {"split", "centralized"}
    # 2 rounds of 2 cars taking 3 batches of 32 each; the baseline sees as many examples
    assert results["split"]["examples"] == results["centralized"]["examples"] == 2 * 2 * 3 * 32
    rows = {}
    for line in out.splitlines():
        for name in ("split learning (camera side in the car)",
                     "centralized (images pooled on the server)"):
            if line.strip().startswith(name):
                rows[name] = float(line.split()[-5])  # accuracy
    assert rows == {
        "split learning (camera side in the car)":
            round(results["split"]["final"]["accuracy"], 4),
        "centralized (images pooled on the server)":
            round(results["centralized"]["final"]["accuracy"], 4)}
    assert "split learning vs centralized:" in out
    assert "distance correlation of the images with what left the cars:" in out
    assert_report(run / "report.html", out)
