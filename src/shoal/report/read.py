"""Load what a report shows from a run directory or a comparison directory.

A **run directory** (``shoal run --out DIR``)::

    DIR/config.toml                  the resolved config
    DIR/summary.json                 {"config": {...}, "results": [{paradigm, rounds, final, ...}]}
    DIR/<paradigm>/metrics.jsonl     one JSON object per round
    DIR/<paradigm>/costs.json        every participant's messages, bytes and compute
    DIR/audit.json                   optional: {paradigm: {audit: {...}}} (``shoal audit``)

A **comparison directory** (``shoal compare``)::

    DIR/compare.json                 {"config": {...}, "variants": [{name, paradigm, run_dir,
                                      status, figures: {...}}]}
    DIR/<run_dir>/...                each variant's own run directory, as above

A **run of several seeds** (``shoal run --seeds 0,1,2``)::

    DIR/config.toml, DIR/seeds.json  the config with its seeds; the spread of each paradigm's
                                     figures across them (:mod:`shoal.seeds`)
    DIR/seed-<s>/...                 each seed's own run directory, as above

All load into one :class:`ReportData`: a list of :class:`Entry` (a paradigm of a run, or a
variant of a comparison), each with its figures (the comparison's figure names, ``None`` where
nothing was measured — the page shows "—", it never invents a figure), its per-round history
and its audits. A file that is missing or unreadable raises
:class:`~shoal.errors.CheckpointError` naming the file and how to get a good one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..metrics import distribution_summary, lower_is_better
from .clients import FederationCache, client_scores

__all__ = ["FIGURES", "STATUSES", "Entry", "ReportData", "load_report", "read_metrics_file",
           "run_figures"]

FIGURES = ("accuracy", "accuracy_worst_client", "accuracy_p10", "epsilon", "protects",
           "bytes_per_participant", "bytes_total", "seconds", "compute_s_per_participant",
           "rounds", "examples", "stopped")
"""The figures of one entry, in the comparison's names (``compare.json``'s ``figures``)."""

STATUSES = ("finished", "failed", "skipped", "pending")
"""A comparison variant's ``status``: only finished ones have figures and curves."""

PARADIGM_NAMES = ("centralized", "data_parallel", "federated", "split", "swarm")


@dataclass(frozen=True)
class Entry:
    """One line of the report: a paradigm of a run, or a variant of a comparison.

    ``figures`` holds every name of :data:`FIGURES` (``None``: not measured); ``history`` the
    run's rounds as ``metrics.jsonl`` has them (empty for a variant that did not finish);
    ``audit`` the audits that ran against it (``{}``: none), by audit name; ``final`` the
    run's last evaluation (``summary.json``'s ``final``); ``reason`` why a variant failed or
    was skipped; ``clients`` the final model's primary metric on each client's held-out data
    (by client id; empty when not computed, and ``clients_why`` says why).
    """

    name: str
    paradigm: str
    status: str
    figures: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    audit: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    clients: dict[str, float] = field(default_factory=dict)
    clients_why: str = ""
    seed: int | None = None

    @property
    def finished(self) -> bool:
        """Whether the entry ran to its end (only those are compared in the reading)."""
        return self.status == "finished"


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows: ``kind`` is ``"run"`` or ``"comparison"``; ``primary`` the
    metric the entries are judged by (``accuracy`` unless the task says otherwise) and
    ``lower_is_better`` its direction; ``config_text`` the config as the directory holds it."""

    kind: str
    path: Path
    config: dict[str, Any]
    config_text: str
    entries: list[Entry]
    primary: str = "accuracy"
    lower_is_better: bool = False
    spread: dict[str, Any] = field(default_factory=dict)
    """A run of several seeds: ``seeds.json``'s ``paradigms`` (each metric's spread across
    the seeds); empty otherwise."""

    @property
    def baseline(self) -> Entry | None:
        """The finished centralized entry (the pooled-data baseline), if there is one (of the
        first seed, in a run of several)."""
        return next((e for e in self.entries if e.finished and e.paradigm == "centralized"),
                    None)

    def baseline_of(self, entry: Entry) -> Entry | None:
        """The baseline ``entry`` is read against: the centralized entry of its own seed."""
        return next((e for e in self.entries if e.finished and e.paradigm == "centralized"
                     and e.seed == entry.seed), None)


# -- files -----------------------------------------------------------------------------------

def _read_json(path: Path, fix: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"shoal report: {path} is missing. {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"shoal report: cannot read {path} ({e}). {fix}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"shoal report: {path} is not valid JSON ({e.msg} at line {e.lineno}, column "
            f"{e.colno}); it was perhaps cut short while being written. {fix}") from e


def read_metrics_file(path: Path, fix: str) -> list[dict[str, Any]]:
    """The rounds of a ``metrics.jsonl`` (one JSON object a line), in file order.

    Raises :class:`~shoal.errors.CheckpointError` naming the file (and the line) when it is
    missing or a line is not a JSON object; ``fix`` says how to get a good file.
    """
    if not path.is_file():
        raise CheckpointError(f"shoal report: {path} is missing. {fix}")
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"shoal report: cannot read {path} ({e}). {fix}") from e
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"shoal report: {path} line {n} is not valid JSON ({e.msg}); each line must be "
                f"one round's metrics as a JSON object. {fix}") from e
        if not isinstance(row, dict):
            raise CheckpointError(
                f"shoal report: {path} line {n} is a JSON {type(row).__name__}, expected an "
                f"object of one round's metrics. {fix}")
        if "round" in row:
            r = row["round"]
            if isinstance(r, float) and math.isfinite(r) and r.is_integer():
                row["round"] = r = int(r)
            if isinstance(r, bool) or not isinstance(r, int):
                raise CheckpointError(
                    f"shoal report: {path} line {n} has 'round' = {json.dumps(r)[:40]}, "
                    f"expected a whole number (the round the line's metrics are of). {fix}")
        rows.append(row)
    return rows


def _path_part(value: str, what: str, where: str, fix: str) -> str:
    """``value`` when it names one entry of a directory (no separator, not ``.``/``..``):
    it becomes part of a path below the report's directory, never a way out of it."""
    if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise CheckpointError(
            f"shoal report: {where} has {what} {value[:80]!r}, which is not a plain name (no "
            f"'/', not '.' or '..'); it names a directory of the run. {fix}")
    return value


def _number(value: Any) -> float | None:
    """A finite float, or ``None`` (not measured; NaN and strings count as not measured)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _primary(config: Mapping[str, Any], finals: list[Mapping[str, Any]]) -> tuple[str, bool]:
    """The metric the entries are judged by: the config's ``evaluation.primary``, else
    accuracy, else the first error metric the runs report."""
    named = _mapping(config.get("evaluation")).get("primary")
    if isinstance(named, str) and named:
        return named, lower_is_better(named)
    for candidate in ("accuracy", "rmse", "mae", "perplexity", "loss"):
        if any(candidate in f for f in finals):
            return candidate, lower_is_better(candidate)
    return "accuracy", False


# -- a run directory -------------------------------------------------------------------------

def _run_fix(run_dir: Path) -> str:
    return (f"Rerun the run (`shoal run --resume {run_dir}` finishes an interrupted one and "
            "rewrites its files), or point shoal report at another directory.")


def _load_audit(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "audit.json"
    if not path.exists():
        return {}
    data = _read_json(path, f"Rerun `shoal audit {run_dir}` to rewrite it, or delete it to "
                            "report without audits.")
    if not isinstance(data, dict):
        raise CheckpointError(
            f"shoal report: {path} holds a JSON {type(data).__name__}, expected an object "
            f"{{paradigm: {{audit: figures}}}} as `shoal audit` writes; rerun `shoal audit "
            f"{run_dir}` to rewrite it.")
    return data


def run_figures(result: Mapping[str, Any], primary: str) -> dict[str, Any]:
    """The comparison's figures (:data:`FIGURES`) of one ``summary.json`` result, from what it
    measured; ``None`` for each figure it did not measure."""
    final = _mapping(result.get("final"))
    cost = _mapping(result.get("cost"))
    clients = _mapping(cost.get("clients"))
    privacy = _mapping(result.get("privacy"))
    sent, received = (_number(clients.get(k)) for k in ("bytes_sent_mean",
                                                        "bytes_received_mean"))
    tail = "p90" if lower_is_better(primary) else "p10"
    stopped = result.get("stopped")
    protects = privacy.get("protects")
    return {
        "accuracy": _number(final.get(primary)),
        "accuracy_worst_client": _number(final.get(f"fed_eval/{primary}_worst")),
        "accuracy_p10": _number(final.get(f"fed_eval/{primary}_{tail}")),
        "epsilon": _number(privacy.get("epsilon")),
        "protects": protects if isinstance(protects, str) else None,
        "bytes_per_participant": (None if sent is None or received is None
                                  else sent + received),
        "bytes_total": _number(result.get("bytes")),
        "seconds": _number(result.get("seconds")),
        "compute_s_per_participant": _number(clients.get("compute_s_mean")),
        "rounds": _number(result.get("rounds")),
        "examples": _number(result.get("examples")),
        "stopped": stopped if isinstance(stopped, str) else None,
    }


def _with_clients(entry: Entry, run_dir: Path, primary: str,
                  cache: FederationCache | None) -> Entry:
    """``entry`` with its per-client figures (:mod:`shoal.report.clients`), when asked."""
    if cache is None or not entry.finished:
        return entry
    scores = client_scores(run_dir, entry.paradigm, primary, cache)
    figures = dict(entry.figures)
    if scores.values and figures["accuracy_worst_client"] is None:
        # the run did not evaluate on the clients (the centralized baseline): the report did
        lower = lower_is_better(primary)
        spread = distribution_summary(list(scores.values.values()), lower_is_better=lower)
        figures["accuracy_worst_client"] = spread["worst"]
        figures["accuracy_p10"] = spread["p90" if lower else "p10"]
    return replace(entry, figures=figures, clients=scores.values, clients_why=scores.why)


def _load_run(run_dir: Path, cache: FederationCache | None) -> ReportData:
    fix = _run_fix(run_dir)
    summary = _read_json(run_dir / "summary.json", fix)
    results = summary.get("results") if isinstance(summary, dict) else None
    if not isinstance(results, list) or not all(isinstance(r, dict) and "paradigm" in r
                                                for r in results):
        raise CheckpointError(
            f"shoal report: {run_dir / 'summary.json'} does not hold a list 'results' of "
            f"paradigm results (each with a 'paradigm'), as `shoal run` writes. {fix}")
    config = _mapping(summary.get("config"))
    toml = run_dir / "config.toml"
    config_text = (toml.read_text(encoding="utf-8", errors="replace") if toml.is_file()
                   else json.dumps(config, indent=2))
    primary, lower = _primary(config, [_mapping(r.get("final")) for r in results])
    audits = _load_audit(run_dir)
    entries = []
    for r in results:
        paradigm = _path_part(str(r["paradigm"]), "paradigm", str(run_dir / "summary.json"),
                              fix)
        history = read_metrics_file(run_dir / paradigm / "metrics.jsonl", fix)
        entry = Entry(name=paradigm, paradigm=paradigm, status="finished",
                      figures=run_figures(r, primary), history=history,
                      audit=_mapping(audits.get(paradigm)), final=_mapping(r.get("final")))
        entries.append(_with_clients(entry, run_dir, primary, cache))
    return ReportData("run", run_dir, config, config_text, entries, primary, lower)


# -- a run of several seeds --------------------------------------------------------------------

def _load_seeds(root: Path, cache: FederationCache | None) -> ReportData:
    """Every seed's run (``seeds.json``'s ``runs``), its entries named ``PARADIGM (seed S)``,
    and the spread across seeds."""
    fix = (f"Run it again with `shoal run --resume {root}`, or report one seed's run "
           f"directory, e.g. `shoal report {root / 'seed-0'}`.")
    summary = _read_json(root / "seeds.json", fix)
    runs = summary.get("runs") if isinstance(summary, dict) else None
    if not isinstance(runs, dict) or not runs or not all(
            isinstance(s, str) and s.isdigit() for s in runs):
        raise CheckpointError(f"shoal report: {root / 'seeds.json'} does not hold 'runs', "
                              f"each seed's run directory by seed, as `shoal run --seeds` "
                              f"writes it. {fix}")
    entries = []
    first: ReportData | None = None
    for s in sorted(runs, key=int):
        name = _path_part(str(runs[s]), "run directory", str(root / "seeds.json"), fix)
        run = _load_run(root / name, cache)
        first = first or run
        entries += [replace(e, name=f"{e.name} (seed {s})", seed=int(s)) for e in run.entries]
    assert first is not None
    toml = root / "config.toml"
    text = (toml.read_text(encoding="utf-8", errors="replace") if toml.is_file()
            else first.config_text)
    return ReportData("seeds", root, first.config, text, entries, first.primary,
                      first.lower_is_better, spread=_mapping(summary.get("paradigms")))


# -- a comparison directory ------------------------------------------------------------------

def _variant(raw: Any, i: int, root: Path) -> Entry:
    where = f"{root / 'compare.json'}: variant {i + 1}"
    fix = f"Run `shoal compare --resume {root}` to finish the comparison and rewrite it."
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise CheckpointError(f"shoal report: {where} is not an object with a 'name'. {fix}")
    name = raw["name"]
    status = raw.get("status", "finished")
    if status not in STATUSES:
        raise CheckpointError(
            f"shoal report: {where} ({name!r}) has status {status!r}; expected one of "
            f"{', '.join(STATUSES)}. {fix}")
    paradigm = _path_part(str(raw.get("paradigm") or name), "paradigm", f"{where} ({name!r})",
                          fix)
    given = _mapping(raw.get("figures"))
    figures = {k: given.get(k) for k in FIGURES}
    for k in FIGURES:
        if k not in ("protects", "stopped"):
            figures[k] = _number(figures[k])
        elif not isinstance(figures[k], str):
            figures[k] = None
    history: list[dict[str, Any]] = []
    audit = _audits_of(given.get("audit"), paradigm)
    final: dict[str, Any] = {}
    run_dir = raw.get("run_dir")
    if status == "finished":
        if not isinstance(run_dir, str) or not run_dir:
            raise CheckpointError(
                f"shoal report: {where} ({name!r}) is finished but names no 'run_dir' (the "
                f"variant's run directory, relative to {root}). {fix}")
        vdir = root / run_dir
        if Path(run_dir).is_absolute() or not vdir.resolve().is_relative_to(root.resolve()) \
                or vdir.resolve() == root.resolve():
            raise CheckpointError(
                f"shoal report: {where} ({name!r}) has run_dir {run_dir[:80]!r}, which is not "
                f"inside the comparison directory {root}; a variant's run_dir is its "
                f"subdirectory (e.g. {name!r}). {fix}")
        history = read_metrics_file(
            vdir / paradigm / "metrics.jsonl",
            f"Variant {name!r} is marked finished, but its run directory lacks it. {fix}")
        if not audit:
            audit = _mapping(_load_audit(vdir).get(paradigm))
        summary = vdir / "summary.json"
        if summary.is_file():
            found = _read_json(summary, fix)
            results = found.get("results", []) if isinstance(found, dict) else None
            if not isinstance(results, list):
                raise CheckpointError(
                    f"shoal report: {summary} does not hold a list 'results' of paradigm "
                    f"results, as `shoal run` writes. {fix}")
            for r in results:
                if isinstance(r, dict) and r.get("paradigm") == paradigm:
                    final = _mapping(r.get("final"))
    reason = raw.get("reason")
    return Entry(name=name, paradigm=paradigm, status=status, figures=figures,
                 history=history, audit=audit, final=final,
                 reason=reason if isinstance(reason, str) and reason else None)


def _audits_of(audit: Any, paradigm: str) -> dict[str, Any]:
    """A variant's audits by name, from its ``figures["audit"]``: either the audits
    themselves or its run's whole ``audit.json`` (``{paradigm: {audit: figures}}``)."""
    audit = _mapping(audit)
    if any(k in PARADIGM_NAMES for k in audit):
        return _mapping(audit.get(paradigm))
    return audit


def _primary_figure(entry: Entry, primary: str) -> Entry:
    """``entry`` with its primary metric as its ``accuracy`` figure when the comparison left
    that empty (a regression task's RMSE), read from the variant's own ``summary.json``."""
    value = _number(entry.final.get(primary))
    if entry.figures["accuracy"] is not None or value is None:
        return entry
    return replace(entry, figures={**entry.figures, "accuracy": value})


def _load_comparison(root: Path, cache: FederationCache | None) -> ReportData:
    fix = f"Run `shoal compare --resume {root}` to finish the comparison and rewrite it."
    data = _read_json(root / "compare.json", fix)
    variants = data.get("variants") if isinstance(data, dict) else None
    if not isinstance(variants, list):
        raise CheckpointError(
            f"shoal report: {root / 'compare.json'} does not hold a list 'variants', as "
            f"`shoal compare` writes. {fix}")
    config = _mapping(data.get("config"))
    entries = [_variant(v, i, root) for i, v in enumerate(variants)]
    primary, lower = _primary(config, [e.final for e in entries])
    raws = [v for v in variants if isinstance(v, dict)]
    entries = [_with_clients(_primary_figure(e, primary), root / str(raw.get("run_dir", "")),
                             primary, cache) for e, raw in zip(entries, raws, strict=True)]
    return ReportData("comparison", root, config, json.dumps(config, indent=2), entries,
                      primary, lower)


def load_report(path: str | Path, *, clients: bool = True,
                trust_code: bool = True) -> ReportData:
    """Load a run directory (``summary.json``), a run of several seeds (``seeds.json``) or a
    comparison directory (``compare.json``).

    ``clients``: also evaluate each finished paradigm's final model on every client's
    held-out data (:mod:`shoal.report.clients`; seconds for small tasks), for the per-client
    distribution. ``trust_code``: also for a task the directory's config names as code
    (``module:factory``), which imports and runs it; pass ``False`` for a directory someone
    else wrote.

    Raises :class:`~shoal.errors.CheckpointError` when ``path`` is neither, or one of its
    files is missing or unreadable; the message names the file and how to fix it.
    """
    root = Path(path)
    if not root.exists():
        raise CheckpointError(
            f"shoal report: {root} does not exist; give the directory of a run (`shoal run "
            "--out DIR`) or of a comparison (`shoal compare`).")
    if not root.is_dir():
        raise CheckpointError(
            f"shoal report: {root} is a file; give the directory that holds summary.json (a "
            "run) or compare.json (a comparison).")
    if (root / "compare.json").exists():
        return _load_comparison(root, FederationCache(trust_code) if clients else None)
    if (root / "summary.json").exists():
        return _load_run(root, FederationCache(trust_code) if clients else None)
    if (root / "seeds.json").exists():
        return _load_seeds(root, FederationCache(trust_code) if clients else None)
    if (root / "config.toml").exists():
        raise CheckpointError(
            f"shoal report: {root / 'summary.json'} is missing: the run has not finished. "
            f"{_run_fix(root)}")
    raise CheckpointError(
        f"shoal report: {root} holds neither summary.json (a run directory, `shoal run --out "
        "DIR`) nor compare.json (a comparison directory, `shoal compare`); give one of those.")
