"""examples/clinics_swarm.py: swarm vs FedAvg vs pooled data vs each clinic alone on the four
heart-disease hospitals; ends in the comparison's report."""

from __future__ import annotations

from pathlib import Path

from .run import assert_report, run_example, summary, variants


def test_clinics_swarm_compares_and_writes_its_report(tmp_path: Path) -> None:
    out = run_example("clinics_swarm.py", "--rounds", "2", "--out", "cl", cwd=tmp_path)
    run = tmp_path / "cl"
    found = variants(run)
    assert set(found) == {"swarm", "federated", "centralized"}
    assert all(v["status"] == "finished" for v in found.values())
    (swarm,) = summary(run / "swarm")
    assert swarm["paradigm"] == "swarm" and swarm["rounds"] == 2
    rows = {}
    for line in out.splitlines():
        for name in ("swarm (4 peers, ledger)", "FedAvg (coordinator)",
                     "centralized (pooled data)", "cleveland alone", "hungary alone",
                     "switzerland alone", "va alone"):
            if line.strip().startswith(name):
                rows[name] = float(line.split()[-3])  # accuracy
    assert len(rows) == 7
    assert rows["swarm (4 peers, ledger)"] == round(swarm["final"]["accuracy"], 4)
    for hospital in ("cleveland", "hungary", "switzerland", "va"):
        (alone,) = summary(run / "alone" / hospital)
        assert alone["paradigm"] == "centralized"
        assert rows[f"{hospital} alone"] == round(alone["final"]["accuracy"], 4)
    # each clinic alone trained on its own patients only, fewer than the pool's
    pooled = summary(run / "centralized")[0]["examples"]
    assert all(summary(run / "alone" / h)[0]["examples"] < pooled
               for h in ("cleveland", "hungary", "switzerland", "va"))
    assert_report(run / "report.html", out)
