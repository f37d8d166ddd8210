"""The report in a real browser (headless chromium): plotly renders every plot, none empty."""

from __future__ import annotations

import json
import shutil

import pytest

from shoal.report import write_report

pytest.importorskip("selenium", reason="browser tests need selenium (make test installs it)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

_RENDERED = """
const divs = Array.from(document.querySelectorAll('.plotly-graph-div'));
return divs.length > 0 && divs.every(d => d.querySelector('.main-svg'));
"""

_PLOTS = """
return Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => {
  const box = d.getBoundingClientRect();
  return {id: d.id, js: d.classList.contains('js-plotly-plot'),
          width: box.width, height: box.height,
          traces: d.querySelectorAll('.scatterlayer .trace, .boxlayer .trace').length,
          marks: d.querySelectorAll('.scatterlayer .trace path.js-line, '
                                    + '.scatterlayer .trace .points path, '
                                    + '.boxlayer .trace .points path').length,
          boxes: d.querySelectorAll('.boxlayer .trace path.box').length};
});
"""


def test_every_plot_renders_with_data_in_the_browser(browser, comparison, tmp_path):
    root = tmp_path / "cmp"
    shutil.copytree(comparison, root)
    path = write_report(root)
    browser.get(path.resolve().as_uri())
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(_RENDERED))
    assert browser.execute_script("return typeof window.Plotly") == "object"
    plots = browser.execute_script(_PLOTS)
    assert [p["id"] for p in plots] == ["plot-progress", "plot-epsilon", "plot-clients",
                                       "plot-bytes", "plot-privacy_utility", "plot-roc"]
    for p in plots:
        assert p["js"] and p["width"] > 100 and p["height"] > 100, p
        assert p["traces"] >= 1 and p["marks"] >= 1, p
    # the per-client distribution: a box per finished variant, a dot per client
    clients = plots[2]
    assert clients["boxes"] == 3 and clients["marks"] >= 3 * 6, clients
    assert browser.find_elements(By.CSS_SELECTOR, ".note") == []
    rows = browser.find_elements(By.CSS_SELECTOR, "#table-figures tbody tr")
    assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == [
        "centralized", "federated", "federated-dp", "split", "swarm", "split-u"]
    reading = browser.find_element(By.ID, "reading").text
    assert "federated-dp with DP at ε = " in reading and "membership inference AUC" in reading
    assert reading.endswith("Not finished, so not read: split (pending), swarm (failed: "
                            "RoundError: no peer replied), split-u (skipped: the model cannot "
                            "be cut twice).")
    if hasattr(browser, "get_log"):  # chromedriver's console log: no script errors
        try:
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        except Exception:  # noqa: BLE001 - a driver without the log endpoint
            errors = []
        assert errors == []


def test_the_progress_plot_switches_to_examples_seen(browser, comparison, tmp_path):
    root = tmp_path / "cmp"
    shutil.copytree(comparison, root)
    browser.get(write_report(root).resolve().as_uri())
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(_RENDERED))
    title = ("return document.querySelector('#plot-progress .g-x2title').textContent")
    assert browser.execute_script(title) == "round"
    (button,) = [b for b in browser.find_elements(
        By.CSS_SELECTOR, "#plot-progress .updatemenu-button") if "examples" in b.text]
    button.click()
    WebDriverWait(browser, 10).until(
        lambda d: d.execute_script(title) == "training examples seen")
    xs = browser.execute_script("return document.getElementById('plot-progress').data[0].x")
    history = [json.loads(line) for line in
               (root / "plain" / "centralized" / "metrics.jsonl").read_text().splitlines()]
    seen, total = [], 0.0
    for h in history:
        total += h["train/examples"]
        seen.append(total)
    assert xs == seen


def test_a_run_without_dp_shows_its_notes_instead_of_empty_plots(browser, plain_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    browser.get(write_report(run).resolve().as_uri())
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(_RENDERED))
    ids = [p["id"] for p in browser.execute_script(_PLOTS)]
    assert ids == ["plot-progress", "plot-clients", "plot-bytes"]
    notes = [n.text for n in browser.find_elements(By.CSS_SELECTOR, ".note")]
    assert notes == ["no DP in this run: no ε curve.",
                     "no DP in this run: no privacy–utility curve.",
                     "no audit ran (`shoal audit DIR` runs them): no ROC curve."]
