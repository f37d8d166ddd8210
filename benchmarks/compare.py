"""``shoal compare`` on digits with every paradigm, against each variant run alone.

1. ``shoal compare`` (the CLI command, in this process, ``-q``) runs the eleven variants of
   :data:`shoal.compare.VARIANTS` on digits (an MLP with two hidden layers, so that U-shaped split
   learning has a server part; 10 clients, 5 per round, up to 10 rounds of three local
   epochs, early stopping on the held-out validation set) into one directory and writes its
   ``compare.json`` and ``report.html``; its wall time is the command's, start to end.
2. Each variant that ran is then run alone with :func:`shoal.run_experiment`, with the exact
   config the comparison ran it with (``DIR/<variant>/config.toml``), into a directory of its own;
   its wall time is the call's. The order is compare, alone, alone, compare (ABBA), so that a
   machine that gets busier or quieter during the benchmark weighs on both sides alike; the
   ratio is of the two sums.
3. The report is opened in headless chromium (selenium) and every plot must have drawn.

Modules every run imports (Opacus, the split and swarm code, the report) are imported, and a
one-round comparison of every variant is run, before either clock starts, so neither side pays
what a process pays once.

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
import torch  # noqa: E402
from common import final_line, machine  # noqa: E402

CONFIG = """\
seed = 0
[task]
name = "digits"
layers = 2          # two hidden layers: U-shaped split learning gets a server part
[data]
num_clients = 10
[federated]
rounds = 10
clients_per_round = 5
[client]
epochs = 3
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


def run_compare(config: Path, out: Path) -> tuple[float, list[dict]]:
    """``shoal compare CONFIG --out OUT -q`` in this process: its wall time and variants."""
    from typer.testing import CliRunner

    from shoal.cli import app

    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["compare", str(config), "--out", str(out), "-q"],
                                catch_exceptions=False)
    seconds = time.perf_counter() - t0
    print(result.output, flush=True)
    if result.exit_code != 0:
        raise SystemExit(f"shoal compare exited with {result.exit_code}")
    return seconds, json.loads((out / "compare.json").read_text())["variants"]


def run_alone(compared: Path, variants: list[dict], out: Path) -> float:
    """Every variant that ran in the comparison, alone, with the config it ran with: the sum
    of their wall times."""
    from shoal.config import load_config
    from shoal.experiment import run_experiment

    total = 0.0
    for v in variants:
        if not (compared / v["run_dir"] / "config.toml").is_file():
            continue  # skipped before it started: nothing to run alone
        config = load_config(compared / v["run_dir"] / "config.toml")
        t0 = time.perf_counter()
        try:
            run_experiment(config, out / v["name"])
        except Exception as e:  # noqa: BLE001  (as the comparison recorded it)
            print(f"  alone {v['name']}: {type(e).__name__}: {e}", flush=True)
        seconds = time.perf_counter() - t0
        total += seconds
        print(f"  alone {v['name']:<20} {seconds:6.1f} s", flush=True)
    return total


def main() -> None:
    # One torch thread: on a shared 2-core machine, OpenMP's spinning threads make the same run
    # take from 0.5 to 5 s with the neighbours' load; with one, runs take the time they need.
    torch.set_num_threads(1)
    for name in ("opacus", "shoal.privacy.dpsgd", "shoal.secagg", "shoal.split.paradigm",
                 "shoal.algorithms.swarm", "shoal.data_parallel", "shoal.report", "shoal.cli"):
        importlib.import_module(name)
    print(f"machine: {machine()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="shoal-compare-bench-"))
    try:
        config = work / "digits.toml"
        config.write_text(CONFIG)
        # Warm-up, not timed: one round of every variant, so that what the first run of a
        # process pays once (lazy imports, torch's first kernels, thread pools) weighs on
        # neither side; then compare, alone, alone, compare: a machine that slows down or speeds
        # up over the benchmark (other jobs on it) weighs on both sides alike.
        warm = work / "warm-up.toml"
        warm.write_text(CONFIG.replace("rounds = 10", "rounds = 1"))
        run_compare(warm, work / "warm-up")
        c1, variants = run_compare(config, work / "compare-1")
        a1 = run_alone(work / "compare-1", variants, work / "alone-1")
        a2 = run_alone(work / "compare-1", variants, work / "alone-2")
        c2, again = run_compare(config, work / "compare-2")
        finished = [v["name"] for v in again if v["status"] == "finished"]
        if finished != [v["name"] for v in variants if v["status"] == "finished"]:
            raise SystemExit("the two comparisons finished different variants")
        print(f"compare: {c1:.1f} s, {c2:.1f} s; alone, summed over the variants: {a1:.1f} s, "
              f"{a2:.1f} s", flush=True)
        report = work / "compare-2" / "report.html"
        if not report.exists():
            raise SystemExit("shoal compare wrote no report.html (is shoal.report.write_report "
                             "there?)")
        print(f"report: {report.stat().st_size} bytes, {render(report)} plots drawn in "
              "chromium", flush=True)
        final_line(paradigms=len(finished), report_bytes=report.stat().st_size,
                   compare_overhead_ratio=(c1 + c2) / (a1 + a2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
