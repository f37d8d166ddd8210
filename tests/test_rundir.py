"""Run directories a user can trust: a new run never writes into an old one, checkpoints are
ordered by round and tied to their config, a broken checkpoint or metrics line is survived,
and every mistake is a message, not a traceback."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from safetensors.torch import load_file

from shoal import cli, tree
from shoal.callbacks import MetricsLog, read_metrics
from shoal.checkpoint import (
    check_resume_config,
    config_diff,
    config_hash,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    restore_latest,
    save_checkpoint,
)
from shoal.config import load_config, to_toml
from shoal.data.tasks import load_task
from shoal.errors import CheckpointError
from shoal.experiment import resolve_config, run_experiment

FAST = ["federated.rounds=2", "client.epochs=1", "federated.clients_per_round=3",
        "baseline=false", "task.hidden=16", "data.num_clients=6", "evaluation.central_every=0"]


def _one(text: str) -> str:
    return " ".join(text.split())


# -- 1. reusing a run directory ---------------------------------------------------------------

def test_a_new_run_refuses_a_directory_that_holds_files(tmp_path):
    (tmp_path / "config.toml").write_text("seed = 1\n")
    with pytest.raises(CheckpointError) as e:
        run_experiment(load_config(None, FAST), tmp_path)
    assert str(e.value) == (
        f"run directory {tmp_path} already holds files (a run's, or other ones); a new run does "
        f"not write into it. Continue the run there with `shoal run --resume {tmp_path}`, "
        "replace it with --overwrite (overwrite=True), or pass another --out.")
    assert (tmp_path / "config.toml").read_text() == "seed = 1\n"  # untouched


def test_overwrite_clears_the_old_run_so_its_checkpoints_cannot_come_back(tmp_path):
    old = tmp_path / "federated" / "checkpoints"
    for r in (97, 98):
        save_checkpoint(old, r, {"w": torch.zeros(1)})
    (tmp_path / "federated" / "metrics.jsonl").write_text('{"round": 97}\n{"round": 98}\n')
    (tmp_path / "config.toml").write_text("seed = 1\n")
    (result,) = run_experiment(load_config(None, FAST), tmp_path, overwrite=True)
    assert result.rounds == 2
    assert sorted(p.name for p in old.iterdir()) == ["round-000001", "round-000002"]
    assert [r["round"] for r in read_metrics(tmp_path / "federated" / "metrics.jsonl")] == [1, 2]
    (again,) = run_experiment(load_config(None, FAST), tmp_path, resume=True)
    assert again.rounds == 2 and again.final == result.final


def test_overwrite_deletes_only_run_directories(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError) as e:
        prepare_run_dir(tmp_path, overwrite=True)
    assert str(e.value) == (
        f"run directory {tmp_path} holds files but is not a run directory (no config.toml); "
        "--overwrite deletes only run directories. Pass another --out.")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_checkpoints_are_ordered_by_round_and_a_save_drops_later_rounds(tmp_path):
    for r in (97, 98):  # an older run's, left behind
        save_checkpoint(tmp_path, r, {"w": torch.full((1,), float(r))})
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1)})  # by name, pruning deleted this one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "round-000001"
    for r in (999_999, 1_000_000):  # "round-1000000" < "round-999999" by name
        save_checkpoint(tmp_path, r, {"w": torch.full((1,), float(r))}, keep=3)
    assert latest_checkpoint(tmp_path) == tmp_path / "round-1000000"
    assert load_checkpoint(latest_checkpoint(tmp_path), None)[0] == 1_000_000
    save_checkpoint(tmp_path, 1_000_001, {"w": torch.zeros(1)}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-1000000", "round-1000001"]


def test_the_config_hash_ignores_rounds_and_where_the_run_is_written():
    base = load_config(None, FAST)
    assert config_hash(base) == config_hash(load_config(None, [*FAST, "federated.rounds=9",
                                                                "out_dir=elsewhere"]))
    other = load_config(None, [*FAST, "client.lr=0.5", "seed=3"])
    assert config_hash(base) != config_hash(other)
    assert config_diff(base, other) == ["client.lr: 0.1 -> 0.5", "seed: 0 -> 3"]


class _Transport:
    def restore_node_states(self, nodes):
        self.nodes = nodes


class _Algorithm:
    def init(self, params):
        return {"w": params}


def test_resume_refuses_a_checkpoint_of_another_config_naming_the_fields(tmp_path):
    old = load_config(None, FAST)
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, config=old)
    new = load_config(None, [*FAST, "client.lr=0.5", "federated.rounds=7"])
    with pytest.raises(CheckpointError) as e:
        restore_latest(tmp_path, _Algorithm(), torch.zeros(1), _Transport(), new)
    assert str(e.value) == (
        f"resume: checkpoint {tmp_path / 'round-000001'} belongs to a run with another config; "
        "the fields that differ (checkpoint -> now) are client.lr: 0.1 -> 0.5. A resumed run "
        "keeps the config it started with (only federated.rounds may change). Resume with that "
        "config, or start a new run in another directory (or replace this one with --overwrite).")
    more_rounds = load_config(None, [*FAST, "federated.rounds=7"])
    start, state, _, path = restore_latest(tmp_path, _Algorithm(), torch.zeros(1), _Transport(),
                                           more_rounds)
    assert (start, path.name) == (2, "round-000001") and torch.equal(state["w"], torch.ones(1))


def test_resume_of_a_run_whose_checkpoints_are_another_configs_is_refused(tmp_path):
    """The reported corruption: a second run's config.toml over the first run's checkpoints."""
    class Interrupt:
        def after_round(self, ctx, report):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(None, FAST), tmp_path, callbacks=lambda p, r: [Interrupt()])
    other = resolve_config(load_config(None, [*FAST, "client.lr=0.2"]),
                           load_task("digits", hidden=16))
    (tmp_path / "config.toml").write_text(to_toml(other))
    with pytest.raises(CheckpointError, match=r"resume: checkpoint .*round-000001 belongs to a "
                       r"run with another config; the fields that differ \(checkpoint -> now\) "
                       r"are client.lr: 0.1 -> 0.2\. "):
        run_experiment(other, tmp_path, resume=True)


def test_resume_with_more_rounds_extends_a_finished_run_bit_identically(tmp_path, monkeypatch,
                                                                      capsys):
    run_experiment(load_config(None, FAST), tmp_path / "short")
    code, _ = _shoal(monkeypatch, capsys, "run", "-q", "--resume", str(tmp_path / "short"),
                     "--set", "federated.rounds=3")
    assert code == 0
    run_experiment(load_config(None, [*FAST, "federated.rounds=3"]), tmp_path / "full")
    (result,) = json.loads((tmp_path / "short/summary.json").read_text())["results"][:1]
    assert result["rounds"] == 3
    assert [r["round"] for r in read_metrics(tmp_path / "short/federated/metrics.jsonl")] == [
        1, 2, 3]
    a = load_file(str(tmp_path / "short/federated/model.safetensors"))
    b = load_file(str(tmp_path / "full/federated/model.safetensors"))
    assert tree.equal(a, b)
    assert "rounds = 3" in (tmp_path / "short/config.toml").read_text()
    with pytest.raises(CheckpointError) as e:
        run_experiment(load_config(None, [*FAST, "federated.rounds=4", "client.lr=0.2"]),
                       tmp_path / "short", resume=True)
    assert str(e.value) == (
        f"resume: the config differs from the run's {tmp_path / 'short' / 'config.toml'} in "
        "client.lr: 0.1 -> 0.2 (saved -> now). A resumed run keeps the config it started with "
        "(only federated.rounds may change); resume without the other changes, or start a new "
        "run in another directory.")


# -- 1./2. broken checkpoints and metrics -------------------------------------------------------

def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, {"w": torch.full((1,), float(r))}, keep=3)
    state_file = tmp_path / "round-000003" / "state.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:20])  # truncated
    (tmp_path / "round-000002" / "meta.json").write_text('{"format": ')  # torn
    with pytest.raises(CheckpointError, match=r"state.safetensors cannot be read \("):
        load_checkpoint(tmp_path / "round-000003", None)  # not a raw SafetensorError
    with caplog.at_level(logging.WARNING, logger="shoal.checkpoint"):
        start, state, _, path = restore_latest(tmp_path, _Algorithm(), torch.zeros(1),
                                               _Transport())
    assert (start, path.name) == (2, "round-000001") and float(state["w"]) == 1.0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"checkpoint {tmp_path / 'round-000003'}: state.safetensors "
                                  "cannot be read (")
    assert warnings[0].endswith("); it is truncated or corrupt. Resuming from the checkpoint "
                                "before it instead.")
    assert warnings[1].startswith(f"checkpoint {tmp_path / 'round-000002'}: meta.json cannot be "
                                  "read (")
    (tmp_path / "round-000001" / "meta.json").write_text("[]")
    with pytest.raises(CheckpointError) as e:
        restore_latest(tmp_path, _Algorithm(), torch.zeros(1), _Transport())
    assert str(e.value).startswith(f"resume: no checkpoint in {tmp_path} can be read: ")
    assert str(e.value).endswith(
        "The run cannot continue from them; start it over (`shoal run CONFIG --out DIR "
        "--overwrite`), or move the broken checkpoints away to restart this paradigm from "
        "round 1.")


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "a": 1.0}\n{"round": 2, "a": 2.0}\n{"round": 3, "a"')
    with caplog.at_level(logging.WARNING, logger="shoal.callbacks"):
        assert read_metrics(path) == [{"round": 1, "a": 1.0}, {"round": 2, "a": 2.0}]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: line 3 is torn (cut off mid-write, as by a crash) and is dropped: "
        "'{\"round\": 3, \"a\"'"]

    class Ctx:  # resumed after round 3, whose line was torn: written back from the history
        round = 3
        history = [{"round": 1, "a": 1.0}, {"round": 2, "a": 2.0}, {"round": 3, "a": 3.0}]

    MetricsLog(path).on_run_start(Ctx())
    assert [json.loads(x) for x in path.read_text().splitlines()] == Ctx.history
    path.write_text('{"round": 1}\n{"round": 2\n{"round": 3}\n')
    with pytest.raises(CheckpointError) as e:
        read_metrics(path)
    assert str(e.value).startswith(f"{path}: line 2 is not a JSON object of one round's "
                                   "metrics (")
    assert str(e.value).endswith("), and it is not the last line, so the file was edited or "
                                 "damaged; restore it or delete the broken lines (each line is "
                                 "one round).")


# -- 2. the command's messages -------------------------------------------------------------------

def _shoal(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["shoal", *args])
    monkeypatch.setattr(cli.err_console, "width", 1000)
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return int(e.value.code or 0), _one(err)


def test_resume_of_a_missing_or_foreign_directory_says_so(tmp_path, monkeypatch, capsys):
    code, err = _shoal(monkeypatch, capsys, "run", "--resume", str(tmp_path / "nope"))
    assert code == 2
    assert err == _one(
        f"error: resume: the run directory {tmp_path / 'nope'} does not exist; pass the "
        "directory a run wrote (it holds config.toml and a folder per paradigm), e.g. `shoal "
        "run --resume runs/digits-federated-20261123-191500`.")
    code, err = _shoal(monkeypatch, capsys, "run", "--resume", str(tmp_path))
    assert code == 2
    assert err == _one(
        f"error: resume: {tmp_path} is not a run directory (it has no config.toml); pass the "
        "directory a run wrote, which holds config.toml and a folder per paradigm.")


def test_out_on_a_file_or_under_one_is_a_message(tmp_path, monkeypatch, capsys):
    f = tmp_path / "file"
    f.write_text("")
    code, err = _shoal(monkeypatch, capsys, "run", "-q", "--out", str(f))
    assert code == 2
    assert err == _one(
        f"error: run directory {f} is an existing file, not a directory; pass an --out that "
        "does not exist yet (or an empty directory).")
    code, err = _shoal(monkeypatch, capsys, "run", "-q", "--out", str(f / "run"))
    assert code == 2
    assert err == _one(
        f"error: run directory {f / 'run'} cannot be created (Not a directory); pass an --out "
        "in a directory you can write to.")


def test_resume_allows_more_rounds_and_refuses_other_changes(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.toml").write_text(to_toml(load_config(None, FAST)))
    code, err = _shoal(monkeypatch, capsys, "run", "--resume", str(tmp_path), "--set",
                       "client.lr=0.5", "--set", "federated.rounds=3", "--set", "seed=2")
    assert code == 2
    assert err == _one(
        "error: --resume: --set client.lr=0.5, seed=2: a resumed run keeps the config it "
        "started with; only federated.rounds may change (e.g. --set federated.rounds=50 extends "
        "a finished run). Drop the other --set options, or start a new run with them.")
    code, err = _shoal(monkeypatch, capsys, "run", "--resume", str(tmp_path), "--overwrite")
    assert code == 2 and "drop the CONFIG argument and the --out and --overwrite options" in err


def test_more_rounds_are_refused_when_the_privacy_noise_was_calibrated_to_the_rounds(tmp_path):
    dp = [*FAST, "privacy.mode=sample", "privacy.target_epsilon=8"]
    (tmp_path / "config.toml").write_text(to_toml(load_config(None, dp)))
    check_resume_config(tmp_path, load_config(None, dp))  # the same rounds: fine
    with pytest.raises(CheckpointError) as e:
        check_resume_config(tmp_path, load_config(None, [*dp, "federated.rounds=4"]))
    assert str(e.value) == (
        "resume: federated.rounds 2 -> 4: the run's privacy noise was calibrated so that 2 rounds "
        "spend privacy.target_epsilon; other rounds would spend another budget with another "
        "noise. Resume with federated.rounds = 2, or start a new run with the rounds you want.")
