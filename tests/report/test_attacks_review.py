"""A hostile review of ``shoal report``: a run or comparison directory whose files carry
hostile strings (variant, audit and metric names, reasons) or are damaged. The page must stay
one self-contained file where nothing from the directory runs as script, and every damaged
file must fail with a message naming it, never a traceback."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from shoal.errors import CheckpointError
from shoal.report import load_report, write_report

SCRIPTY = [
    '<img src=x onerror="window.__pwned=1">',
    "</script><script>window.__pwned=2</script>",
    '<a href="javascript:window.__pwned=3">click</a>',
    "<svg onload=window.__pwned=4>",
    "%{x}<b>bold</b>&amp;",
]


def _copy(src: Path, tmp_path: Path, name: str = "cmp") -> Path:
    root = tmp_path / name
    shutil.copytree(src, root)
    for page in root.rglob("report.html"):
        page.unlink()
    return root


def _hostile_comparison(comparison: Path, tmp_path: Path) -> Path:
    root = _copy(comparison, tmp_path)
    spec = json.loads((root / "compare.json").read_text())
    for i, v in enumerate(spec["variants"]):
        v["name"] = SCRIPTY[i % len(SCRIPTY)] + f" #{i}"
        if v["status"] != "finished":
            v["reason"] = SCRIPTY[(i + 1) % len(SCRIPTY)]
        v["figures"]["protects"] = SCRIPTY[(i + 2) % len(SCRIPTY)]
        v["figures"]["stopped"] = SCRIPTY[(i + 3) % len(SCRIPTY)]
    spec["variants"][2]["figures"]["audit"] = {
        SCRIPTY[0]: {"auc": 0.6, "roc": {"fpr": [0, 0.5, 1], "tpr": [0, 0.7, 1]},
                     "note": SCRIPTY[1]}}
    spec["config"]["task"]["name"] = SCRIPTY[1]
    (root / "compare.json").write_text(json.dumps(spec))
    return root


def test_hostile_strings_never_run_in_the_browser(browser, comparison, tmp_path) -> None:
    """Attack: every name, reason and note of the comparison is HTML with a script (event
    handlers, a closing script tag, a javascript: link, plotly's own %{} fields). The page
    renders its plots, shows the names as text, runs none of it and loads nothing."""
    from selenium.webdriver.support.ui import WebDriverWait

    root = _hostile_comparison(comparison, tmp_path)
    page = write_report(root)
    html = page.read_text(encoding="utf-8")
    for s in SCRIPTY[:4]:
        assert s not in html
    browser.get(page.as_uri())
    WebDriverWait(browser, 8).until(lambda d: d.execute_script(
        "const ds = document.querySelectorAll('.plotly-graph-div');"
        "return ds.length > 0 && Array.from(ds).every(d => d.querySelector('.main-svg'));"))
    time.sleep(0.3)  # let any injected handler fire
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.execute_script(
        "return document.querySelectorAll('img, iframe, object, embed, body svg[onload],"
        " [onerror], [onload]').length") == 0
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('a')).map("
        "a => a.getAttribute('href') || a.getAttribute('xlink:href') || '')")
    assert not [h for h in links if h.strip().lower().startswith("javascript")]
    # no request left the page: it is self-contained
    assert browser.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(r => !r.name.startsWith('data:') && !r.name.startsWith('file:')).length") == 0
    text = browser.execute_script("return document.body.innerText")
    assert "window.__pwned=1" in text  # shown, as text


def _variant_run(root: Path, index: int = 1) -> Path:
    spec = json.loads((root / "compare.json").read_text())
    return root / spec["variants"][index]["run_dir"]


@pytest.mark.parametrize("row", [
    {"round": "one", "central/accuracy": 0.5},
    {"round": None, "central/accuracy": 0.5},
    {"round": 1e400},
    {"round": [1]},
    {"round": 2.5},
])
def test_a_round_that_is_not_a_whole_number_is_named_not_a_traceback(comparison, tmp_path,
                                                                     row) -> None:
    """Attack: a hand-edited ``metrics.jsonl`` whose ``round`` is a string, null, infinite,
    a list or a fraction. Before the fix: ValueError/TypeError/OverflowError from the plots."""
    root = _copy(comparison, tmp_path)
    metrics = _variant_run(root) / "federated" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = json.dumps(row).replace("Infinity", "1e400")
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl line 2.*round"):
        write_report(root)


def test_a_summary_whose_results_are_not_a_list_is_named(comparison, tmp_path) -> None:
    """Attack: a variant's ``summary.json`` holding ``"results": 5``."""
    root = _copy(comparison, tmp_path)
    summary = _variant_run(root) / "summary.json"
    data = json.loads(summary.read_text())
    data["results"] = 5
    summary.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"summary\.json"):
        write_report(root)


@pytest.mark.parametrize("audit", [3, "leaky", [1, 2], None])
def test_an_audit_that_is_not_an_object_is_named_or_left_out(comparison, tmp_path,
                                                             audit) -> None:
    """Attack: ``audit.json`` whose audit entry is a number, a string or a list."""
    root = _copy(comparison, tmp_path)
    spec = json.loads((root / "compare.json").read_text())
    spec["variants"][2]["figures"]["audit"] = {"membership": audit}
    (root / "compare.json").write_text(json.dumps(spec))
    try:
        page = write_report(root)
    except CheckpointError as e:
        assert "audit" in str(e)
    else:
        assert page.is_file()


@pytest.mark.parametrize("run_dir", ["../outside", "/", "plain/../../outside"])
def test_a_variant_run_dir_outside_the_comparison_is_refused(comparison, tmp_path,
                                                             run_dir) -> None:
    """Attack: ``compare.json`` naming a run directory outside the comparison (absolute or
    with ``..``): the report would show another run's data as this comparison's."""
    root = _copy(comparison, tmp_path)
    shutil.copytree(root / "plain", tmp_path / "outside")
    spec = json.loads((root / "compare.json").read_text())
    spec["variants"][1]["run_dir"] = run_dir
    (root / "compare.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"run_dir.*inside"):
        load_report(root, clients=False)


@pytest.mark.parametrize("paradigm", ["../plain/federated", "/etc", ".."])
def test_a_paradigm_that_is_a_path_is_refused(comparison, tmp_path, paradigm) -> None:
    """Attack: a ``paradigm`` that walks out of the run directory."""
    root = _copy(comparison, tmp_path)
    spec = json.loads((root / "compare.json").read_text())
    spec["variants"][1]["paradigm"] = paradigm
    (root / "compare.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="paradigm"):
        load_report(root, clients=False)
    run = _copy(comparison / "plain", tmp_path, "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["results"][0]["paradigm"] = paradigm
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CheckpointError, match="paradigm"):
        load_report(run, clients=False)


@pytest.mark.parametrize("damage", [b"\xff\xfe\x00garbage", b'{"variants": [', b"[]", b""])
def test_a_damaged_compare_json_is_named(comparison, tmp_path, damage) -> None:
    root = _copy(comparison, tmp_path)
    (root / "compare.json").write_bytes(damage)
    with pytest.raises(CheckpointError, match=r"compare\.json"):
        write_report(root)


def test_the_cli_reports_a_damaged_directory_without_a_traceback(comparison, tmp_path,
                                                                  monkeypatch, capsys) -> None:
    import sys

    from shoal.cli import main

    root = _copy(comparison, tmp_path)
    metrics = _variant_run(root) / "federated" / "metrics.jsonl"
    metrics.write_text('{"round": "x"}\n')
    monkeypatch.setattr(sys, "argv", ["shoal", "report", str(root)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    assert err.startswith("error: shoal report: ") and "metrics.jsonl line 1" in err


def test_a_hostile_primary_metric_name_stays_text(browser, comparison, tmp_path) -> None:
    """Attack: the config's ``evaluation.primary`` (a metric name: table headers, axis titles,
    the reading) is HTML with a javascript: link and an event handler."""
    from selenium.webdriver.support.ui import WebDriverWait

    root = _copy(comparison, tmp_path)
    spec = json.loads((root / "compare.json").read_text())
    spec["config"].setdefault("evaluation", {})["primary"] = (
        '<a href="javascript:window.__pwned=5">m</a><img src=x onerror=window.__pwned=6>')
    (root / "compare.json").write_text(json.dumps(spec))
    page = write_report(root)
    browser.get(page.as_uri())
    WebDriverWait(browser, 8).until(lambda d: d.execute_script(
        "return document.querySelectorAll('.plotly-graph-div .main-svg').length > 0"))
    time.sleep(0.3)
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('img, [onerror]').length") \
        == 0
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('a')).map("
        "a => a.getAttribute('href') || a.getAttribute('xlink:href') || '')")
    assert not [h for h in links if h.strip().lower().startswith("javascript")]


def test_reporting_a_directory_someone_else_wrote_runs_no_code_from_it(
        comparison, tmp_path, monkeypatch, capsys) -> None:
    """Attack: a run directory whose ``config.toml`` names its task as code,
    ``task.name = "os:system"`` with ``command = "touch PWNED"``. Before the fix `shoal
    report DIR` rebuilt the task for the per-client plot, i.e. ran the command. Now the CLI
    runs no code from the directory without ``--trust-code``, and the page says why."""
    import re
    import sys

    from shoal.cli import main

    run = _copy(comparison / "plain", tmp_path, "run")
    pwned = tmp_path / "PWNED"
    toml = run / "config.toml"
    text = toml.read_text()
    text = re.sub(r'(?m)^name = "digits"$', 'name = "os:system"', text, count=1)
    text = re.sub(r"(?m)^hidden = 16$", f'command = "touch {pwned}"', text, count=1)
    assert 'name = "os:system"' in text and "touch" in text
    toml.write_text(text)
    monkeypatch.setattr(sys, "argv", ["shoal", "report", str(run)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    assert not pwned.exists()
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "--trust-code" in page


def test_out_never_replaces_a_file_that_is_not_a_page(comparison, tmp_path) -> None:
    """Attack (a slip of the user's): ``shoal report DIR --out DIR/summary.json``. Before the
    fix the run's summary was replaced by the page; now it is refused and left as it was.
    Rewriting an earlier report (``.html``) is still allowed."""
    from shoal.errors import ShoalError

    run = _copy(comparison / "plain", tmp_path, "run")
    before = (run / "summary.json").read_bytes()
    with pytest.raises(ShoalError, match="not an HTML file"):
        write_report(run, run / "summary.json")
    assert (run / "summary.json").read_bytes() == before
    page = write_report(run, run / "old.HTML")
    assert write_report(run, page) == page


def test_the_shared_page_does_not_reveal_this_machine_s_paths(comparison, tmp_path) -> None:
    """A report is made to be handed to a colleague: it names the directory, not where it
    lies on this machine."""
    run = _copy(comparison / "plain", tmp_path / "home-of-alice" / "private", "run")
    page = write_report(run).read_text()
    assert "home-of-alice" not in page and str(tmp_path) not in page
    assert "run directory run" in page
