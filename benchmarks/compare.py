"""``shoal compare`` on digits with every paradigm, against each variant run alone.

1. ``shoal compare`` (the CLI command, in this process, ``-q``) runs the eleven variants of
   :data:`shoal.compare.VARIANTS` on digits (8 clients, 4 per round, up to 6 rounds of one local
   epoch, early stopping on the held-out validation set) into one directory and writes its
   ``compare.json`` and ``report.html``; its wall time is the command's, start to end.
2. Each variant that ran is then run alone with :func:`shoal.run_experiment`, with the exact
   config the comparison ran it with (``DIR/<variant>/config.toml``), into a directory of its own;
   its wall time is the call's.
3. The report is opened in headless chromium (selenium) and every plot must have drawn.

Modules every run imports (Opacus, the split and swarm code, the report) are imported before
either clock starts, so neither side pays them.

    python benchmarks/compare.py

Final line: ``paradigms`` (variants that finished), ``report_bytes`` (size of report.html) and
``compare_overhead_ratio`` = compare wall / sum of the alone walls (target <= 1.05).
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import final_line, machine  # noqa: E402

CONFIG = """\
seed = 0
[task]
name = "digits"
[data]
num_clients = 8
[federated]
rounds = 6
clients_per_round = 4
[client]
epochs = 1
batch_size = 32
[data_parallel]
workers = 2
"""


def render(report: Path) -> int:
    """Open ``report`` in headless chromium; the number of plots drawn (each must have drawn)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")
                                              or "/usr/bin/chromedriver"), options=options)
    try:
        driver.get(report.resolve().as_uri())
        deadline = time.time() + 60
        while time.time() < deadline and driver.execute_script(
                "return document.readyState") != "complete":
            time.sleep(0.2)
        plots = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
        if not plots:
            raise SystemExit(f"{report}: no plot drew in chromium")
        for p in plots:
            if not p.find_elements(By.CSS_SELECTOR, ".main-svg"):
                raise SystemExit(f"{report}: plot {p.get_attribute('id')!r} did not draw")
        return len(plots)
    finally:
        driver.quit()


def main() -> None:
    from typer.testing import CliRunner

    from shoal.cli import app
    from shoal.config import load_config
    from shoal.experiment import run_experiment

    for name in ("opacus", "shoal.privacy.dpsgd", "shoal.secagg", "shoal.split.paradigm",
                 "shoal.algorithms.swarm", "shoal.data_parallel", "shoal.report"):
        importlib.import_module(name)
    print(f"machine: {machine()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="shoal-compare-bench-"))
    try:
        (work / "digits.toml").write_text(CONFIG)
        out = work / "compare"
        t0 = time.perf_counter()
        result = CliRunner().invoke(app, ["compare", str(work / "digits.toml"), "--out",
                                          str(out), "-q"], catch_exceptions=False)
        compare_s = time.perf_counter() - t0
        print(result.output, flush=True)
        if result.exit_code != 0:
            raise SystemExit(f"shoal compare exited with {result.exit_code}")
        variants = json.loads((out / "compare.json").read_text())["variants"]
        finished = [v for v in variants if v["status"] == "finished"]
        ran = [v for v in variants if (out / v["run_dir"] / "config.toml").is_file()]
        alone_s = {}
        for v in ran:
            config = load_config(out / v["run_dir"] / "config.toml")
            t0 = time.perf_counter()
            try:
                run_experiment(config, work / "alone" / v["name"])
            except Exception as e:  # noqa: BLE001  (as the comparison recorded it)
                print(f"  alone {v['name']}: {type(e).__name__}: {e}", flush=True)
            alone_s[v["name"]] = time.perf_counter() - t0
            print(f"  alone {v['name']:<20} {alone_s[v['name']]:6.1f} s", flush=True)
        total = sum(alone_s.values())
        print(f"compare: {compare_s:.1f} s; alone, summed over {len(alone_s)} variants: "
              f"{total:.1f} s", flush=True)
        report = out / "report.html"
        if not report.exists():
            raise SystemExit("shoal compare wrote no report.html (is shoal.report.write_report "
                             "there?)")
        print(f"report: {report.stat().st_size} bytes, {render(report)} plots drawn in "
              "chromium", flush=True)
        final_line(paradigms=len(finished), report_bytes=report.stat().st_size,
                   compare_overhead_ratio=compare_s / total)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
