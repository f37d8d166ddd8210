"""A hostile review of ``shoal compare``: ``--resume`` pointed at a damaged, foreign or edited
comparison; the refusals must name the file and the fix, and must not touch the user's files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from shoal.callbacks import read_metrics
from shoal.compare import compare
from shoal.errors import CheckpointError, ShoalError

from ._configs import tiny


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-variant comparison (centralized: the fastest)."""
    out = tmp_path_factory.mktemp("cmp") / "c"
    compare(tiny(), out, only=["centralized"])
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _damaged(finished: Path, tmp_path: Path, edit) -> Path:
    import shutil

    root = tmp_path / "c"
    shutil.copytree(finished, root)
    target = root / "compare.json"
    result = edit(json.loads(target.read_text()), target)
    if result is not None:
        target.write_text(json.dumps(result))
    return root


def _bytes(data, path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00\x01 not text")


def _dir(data, path: Path) -> None:
    path.unlink()
    path.mkdir()


DAMAGE = {
    "not UTF-8": _bytes,
    "a directory": _dir,
    "variants not a list": lambda d, p: {**d, "variants": "centralized"},
    "a variant not an object": lambda d, p: {**d, "variants": [1]},
    "a variant without a name": lambda d, p: {**d, "variants": [{"status": "finished"}]},
    "an unknown variant": lambda d, p: {**d, "variants": [{**d["variants"][0],
                                                           "name": "federated-magic"}]},
    "a config that is not a config": lambda d, p: {**d, "config": ["not", "a", "config"]},
    "a config with a bad field": lambda d, p: {**d, "config": {**d["config"], "federated": {
        **d["config"]["federated"], "rounds": -4}}},
    "JSON null": lambda d, p: None if p.write_text("null") else None,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_of_a_damaged_compare_json_names_it_and_touches_nothing(finished, tmp_path,
                                                                       damage) -> None:
    """Attack: ``--resume`` at a ``compare.json`` that is binary, a directory, or holds
    variants or a config `shoal compare` never writes. Before the fix several of these were
    a UnicodeDecodeError, IsADirectoryError, TypeError or KeyError traceback, or blamed a
    ``--only`` the user never passed."""
    root = _damaged(finished, tmp_path, DAMAGE[damage])
    before = _snapshot(root)
    with pytest.raises(ShoalError, match=r"compare\.json") as e:
        compare(None, root, resume=True)
    assert "--only" not in str(e.value)
    assert _snapshot(root) == before  # nothing rewritten


def test_the_cli_prints_a_damaged_resume_without_a_traceback(finished, tmp_path, monkeypatch,
                                                             capsys) -> None:
    from shoal.cli import main

    root = _damaged(finished, tmp_path, _bytes)
    monkeypatch.setattr(sys, "argv", ["shoal", "compare", "--resume", str(root)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code not in (0, None)
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and "compare.json" in err


def test_resume_accepts_the_same_variants_in_another_order(tmp_path) -> None:
    """``--only a,b`` on resume names the same comparison as ``--only b,a``: refusing it
    (as before the fix, "resume it ... with the same list") is a spurious error."""
    out = tmp_path / "c"
    compare(tiny(), out, only=["federated", "centralized"])
    results = compare(None, out, only=["federated", "centralized"], resume=True)
    assert [r.name for r in results] == ["centralized", "federated"]
    assert all(r.status == "finished" for r in results)


class _Interrupt:
    def after_round(self, ctx, report):
        if report.round == 2:
            raise KeyboardInterrupt

    def __getattr__(self, name):  # every other callback hook: nothing
        return lambda *a, **k: None


def test_a_comparison_whose_config_was_edited_never_mixes_checkpoints(tmp_path) -> None:
    """Attack: a comparison interrupted in the middle of a variant; then its ``compare.json``
    is edited to another config (another seed and learning rate) and resumed. The
    interrupted variant's checkpoints belong to the old config: they must not be continued
    with the new one (its rounds would mix two configs in one run)."""
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        compare(tiny(), out, only=["federated"],
                callbacks=lambda v, p, r: [_Interrupt()])
    spec = json.loads((out / "compare.json").read_text())
    spec["config"]["seed"] = spec["config"]["seed"] + 1
    spec["config"]["client"]["lr"] = spec["config"]["client"]["lr"] * 3
    (out / "compare.json").write_text(json.dumps(spec))
    metrics = out / "federated" / "federated" / "metrics.jsonl"
    rounds_before = [h["round"] for h in read_metrics(metrics)]
    try:
        results = compare(None, out, resume=True)
    except ShoalError as e:
        assert "config" in str(e)
    else:
        assert results[0].status != "finished", results[0]
        assert "config" in (results[0].reason or "")
    assert [h["round"] for h in read_metrics(metrics)] == rounds_before


def test_a_new_comparison_into_a_file_or_resume_of_a_run_directory_is_refused(
        finished, tmp_path) -> None:
    """Attack: ``--out`` naming a file the user keeps, and ``--resume`` pointed at a
    directory `shoal run` wrote (not a comparison): both refused, nothing written."""
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    with pytest.raises(ShoalError, match="notes.txt"):
        compare(tiny(), precious, only=["centralized"])
    assert precious.read_text() == "mine"
    run = finished / "centralized"  # a run directory: summary.json, no compare.json
    before = _snapshot(run)
    with pytest.raises(ShoalError, match="not a comparison directory"):
        compare(None, run, resume=True)
    assert _snapshot(run) == before


def test_a_second_comparison_in_the_same_directory_is_refused_while_one_runs(tmp_path) -> None:
    """Attack: ``shoal compare --resume DIR`` started twice (two terminals, a retried job).
    Before the fix both ran the same variants into the same run directories and rewrote
    the same ``compare.json``. Now the directory is locked while one runs."""
    import threading

    out = tmp_path / "c"
    inside, release = threading.Event(), threading.Event()

    class Hold:
        def before_round(self, ctx, round):
            if round == 1:
                inside.set()
                release.wait(30)

        def __getattr__(self, name):
            return lambda *a, **k: None

    errors: list[BaseException] = []

    def first() -> None:
        try:
            compare(tiny("federated.rounds=1"), out, only=["centralized"],
                    callbacks=lambda v, p, r: [Hold()])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert inside.wait(30)
        before = (out / "compare.json").read_bytes()
        with pytest.raises(ShoalError, match="another `shoal compare` is running"):
            compare(None, out, resume=True)
        assert (out / "compare.json").read_bytes() == before
    finally:
        release.set()
        t.join(60)
    assert not errors
    assert compare(None, out, resume=True)[0].status == "finished"  # free again


def test_a_comparison_judged_by_another_metric_never_labels_accuracy_as_it(tmp_path,
                                                                           monkeypatch,
                                                                           capsys) -> None:
    """Attack (on the user's own data): ``evaluation.primary = "loss"``. Before the fix
    `compare.json`'s figures held the accuracy and the per-client *accuracy*, and the report,
    judging by the loss, showed them as the loss (0.25 "loss", lower is better: every
    reading inverted). Now the figures are the primary metric, worst client the highest
    loss; the CLI table names the metric."""
    from shoal.cli import main
    from shoal.report import load_report

    out = tmp_path / "c"
    cfg = tmp_path / "loss.toml"
    cfg.write_text('[task]\nname = "digits"\n[data]\nnum_clients = 4\n[federated]\nrounds = 2\n'
                   'clients_per_round = 2\n[client]\nepochs = 1\nbatch_size = 32\n'
                   '[evaluation]\nprimary = "loss"\n')
    monkeypatch.setattr(sys, "argv", ["shoal", "compare", str(cfg), "--only", "federated",
                                      "--out", str(out), "-q"])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)
    shown = capsys.readouterr().out
    header = next(line for line in shown.splitlines() if "variant" in line and "status" in line)
    assert "loss" in header and "accuracy" not in header and "p90" in header
    figures = json.loads((out / "compare.json").read_text())["variants"][0]["figures"]
    summary = json.loads((out / "federated" / "summary.json").read_text())
    final = summary["results"][0]["final"]
    assert figures["accuracy"] == pytest.approx(final["loss"])
    assert figures["accuracy"] != pytest.approx(final["accuracy"])
    assert figures["accuracy_worst_client"] >= figures["accuracy_p10"]  # worst = highest loss
    data = load_report(out, clients=False)
    assert data.primary == "loss" and data.lower_is_better
    assert data.entries[0].figures["accuracy"] == pytest.approx(final["loss"])


def test_a_new_comparison_locks_its_directory_before_it_checks_it(tmp_path):
    # Another comparison just created the (still empty) directory and holds its lock.
    import fcntl
    import os

    out = tmp_path / "new"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CheckpointError, match="another `shoal compare` is running in"):
            compare(tiny(), out, only=["centralized"])
    finally:
        os.close(fd)
    assert not any(out.iterdir())  # nothing written by the refused one


def test_files_written_while_a_new_comparison_waited_for_the_lock_are_not_overwritten(
        tmp_path, monkeypatch):
    import contextlib

    import shoal.compare as compare_module

    out = tmp_path / "new"
    taken = compare_module._exclusive

    @contextlib.contextmanager
    def after_the_other(path):  # the other comparison wrote its files before it let go
        (path / "compare.json").write_text('{"theirs": true}')
        with taken(path):
            yield

    monkeypatch.setattr(compare_module, "_exclusive", after_the_other)
    with pytest.raises(CheckpointError, match="already holds files"):
        compare(tiny(), out, only=["centralized"])
    assert (out / "compare.json").read_text() == '{"theirs": true}'
