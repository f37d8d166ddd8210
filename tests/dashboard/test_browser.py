"""The must-show of the issue: the page in a real headless browser updates live, without a
reload, when the run publishes after the page has loaded."""

from __future__ import annotations

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from shoal.dashboard import DashboardState

from ._sse import serving


def _text(browser, css: str) -> str:
    """The text of the first element matching ``css`` ("" if none), read again if the page
    replaced the element while it was being read (every state event re-renders)."""
    for _ in range(20):
        try:
            found = browser.find_elements(By.CSS_SELECTOR, css)
            return found[0].text if found else ""
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{css}: replaced 20 times in a row while being read")


def test_a_metric_published_after_the_page_loaded_appears_without_a_reload(browser) -> None:
    state = DashboardState("browser test")
    state.start_run("federated", 5, info={"task": "digits"})
    state.set_nodes(["client-0", "client-1", "client-7"])
    with serving(state) as server:
        browser.get(server.url)
        wait = WebDriverWait(browser, 15)
        wait.until(lambda b: _text(b, "#conn") == "live")
        assert _text(browser, "#rounds-done") == "0 / 5 rounds"
        assert _text(browser, "#nodes-connected") == "3 connected"
        assert _text(browser, "#status") == "waiting for the first round (3 connected)"
        assert _text(browser, "#epsilon") == "no DP"
        assert not browser.find_elements(By.CSS_SELECTOR, '#metrics tr[data-metric]')
        # A marker on the window: a reload would lose it.
        browser.execute_script("window.__loadedOnce = true;")

        # Published after the page loaded: a round with its metrics, a dropout and ε.
        state.round_started(1)
        state.round_finished(1, {"central/accuracy": 0.8125, "train/loss": 0.5,
                                 "dp/epsilon": 2.5, "dp/delta": 1e-5, "round/dropped": 1.0},
                             dropped={"client-7": "timed out <script>alert(1)</script>"})
        metric = '#metrics tr[data-metric="central/accuracy"] td.v'
        wait.until(lambda b: _text(b, metric) == "0.8125")
        assert _text(browser, "#status") == "running"  # between rounds
        assert browser.execute_script("return window.__loadedOnce === true;")  # no reload
        assert _text(browser, "#rounds-done") == "1 / 5 rounds"
        assert _text(browser, "#epsilon") == "ε = 2.5000"
        assert "δ = 1.0000e-5" in _text(browser, "#privacy-detail")
        row = _text(browser, "#dropouts tbody tr")
        assert row.split(" ", 2) == ["1", "client-7", "timed out <script>alert(1)</script>"]
        assert not browser.find_elements(By.CSS_SELECTOR, "#dropouts script")  # text, not HTML
        assert "round 1: timed out" in _text(browser, '#nodes tr[data-node="client-7"]')
        # The chart drew the metric: some pixels of the canvas are painted.
        painted = browser.execute_script(
            "const c = document.getElementById('chart');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;")
        assert painted > 50

        # And the next round too, then the end of the run.
        state.round_finished(2, {"central/accuracy": 0.875, "dp/epsilon": 3.0})
        wait.until(lambda b: _text(b, metric) == "0.8750")
        state.end_run()
        wait.until(lambda b: _text(b, "#status") == "finished")
        assert browser.execute_script("return window.__loadedOnce === true;")
        assert browser.find_elements(By.CSS_SELECTOR, '#rounds tbody tr[data-round="2"]')
    WebDriverWait(browser, 15).until(lambda b: _text(b, "#conn") == "dashboard closed")
