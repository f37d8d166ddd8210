"""The plots (drawn, or left out with the reason) and the page: self-contained, escaped,
written atomically."""

from __future__ import annotations

import json
import shutil

import pytest
from plotly.offline import get_plotlyjs

from shoal.errors import ShoalError
from shoal.report import build_plots, load_report, write_report

KEYS = ["progress", "epsilon", "clients", "bytes", "privacy_utility", "roc"]


def _points(fig) -> int:
    return sum(len(t.x) for t in fig.data if t.x is not None)


def test_a_comparison_draws_every_plot_from_its_data(comparison):
    data = load_report(comparison)
    plots = {p.key: p for p in build_plots(data)}
    assert list(plots) == KEYS
    for p in plots.values():
        assert p.figure is not None and p.note == "", p.key
        assert _points(p.figure) > 0
    # one ε curve (the DP variant), as many rounds as it ran
    (eps,) = plots["epsilon"].figure.data
    assert eps.name == "federated-dp" and list(eps.x) == [1, 2, 3]
    assert list(eps.y) == [h["dp/epsilon"] for h in data.entries[2].history]
    assert sorted(eps.y) == list(eps.y)
    # accuracy curves of the three finished variants on shared axes, none for the others
    names = {t.name for t in plots["progress"].figure.data}
    assert names == {"centralized", "federated", "federated-dp"}
    roc = [t for t in plots["roc"].figure.data if t.name != "guessing"]
    assert [t.name.split(" (")[0] for t in roc] == ["federated-dp membership"]


def test_a_plot_without_data_is_left_out_with_the_reason(plain_run):
    plots = {p.key: p for p in build_plots(load_report(plain_run))}
    assert plots["epsilon"].figure is None
    assert plots["epsilon"].note == "no DP in this run: no ε curve."
    assert plots["privacy_utility"].note == "no DP in this run: no privacy–utility curve."
    assert plots["roc"].note == "no audit ran (`shoal audit DIR` runs them): no ROC curve."
    for key in ("progress", "clients", "bytes"):
        assert plots[key].figure is not None and _points(plots[key].figure) > 0


def test_without_per_client_figures_the_recorded_summary_is_plotted(plain_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    (run / "federated" / "model.safetensors").unlink()
    (run / "centralized" / "model.safetensors").unlink()
    plots = {p.key: p for p in build_plots(load_report(run))}
    clients = plots["clients"]
    assert {t.name for t in clients.figure.data} == {"worst client", "10th percentile",
                                                     "client mean", "central test set"}
    assert clients.caption.endswith(
        "For federated only the worst client, the 10th percentile and the mean the run "
        f"recorded are shown (federated: {run / 'federated' / 'model.safetensors'} is "
        "missing).")


def test_the_page_is_self_contained_and_written_atomically(plain_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    plotly_js = get_plotlyjs()
    assert page.count(plotly_js) == 1  # plotly.js inline, once
    ours = page.replace(plotly_js, "")
    assert "<script src" not in ours and "http" not in ours.replace("http://www.w3.org", "")
    assert page.count('class="plotly-graph-div"') == 3
    assert page.count('class="note"') == 3 and "no DP in this run: no ε curve." in page
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    out = write_report(run, tmp_path / "deep" / "r.html")
    assert out.read_text(encoding="utf-8") == page
    with pytest.raises(ShoalError, match=r"--out .* is a directory; give a file name"):
        write_report(run, tmp_path)


def test_text_from_the_files_is_escaped(comparison, tmp_path):
    root = tmp_path / "cmp"
    shutil.copytree(comparison, root)
    spec = json.loads((root / "compare.json").read_text())
    evil = "<img src=x onerror=alert(1)></script><script>alert(2)</script>"
    spec["variants"][1]["name"] = evil
    spec["variants"][3]["name"] = "<b>pending</b>"
    (root / "compare.json").write_text(json.dumps(spec))
    page = write_report(root).read_text(encoding="utf-8")
    assert "<img src=x" not in page and "<script>alert" not in page and "<b>pending" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;b&gt;pending&lt;/b&gt; (pending)" in page


def test_examples_seen_is_cumulative_and_absent_when_a_round_hides_its_count():
    from shoal.report.plots import examples_seen

    assert examples_seen([{"round": 1, "train/examples": 10.0},
                          {"round": 2, "train/examples": 12.0}]) == {1: 10.0, 2: 22.0}
    assert examples_seen([{"round": 1, "train/examples": 10.0}, {"round": 2}]) is None
    assert examples_seen([]) is None
