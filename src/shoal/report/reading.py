"""The short plain-language reading of a result, computed from its figures.

One sentence per entry, measured against the pooled-data baseline (the centralized run) when
there is one::

    federated with DP at ε = 3 costs 4.1 points of accuracy (0.919 against 0.960) and moves
    12× the bytes of centralized; its worst client reaches 0.214; label leakage AUC 0.57.

Only figures that were measured are read; a missing one drops its clause, it is never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .fmt import fmt_bytes, fmt_count, fmt_ratio, metric_label
from .read import Entry, ReportData

__all__ = ["entry_sentence", "leakage_clauses", "reading", "spread_sentences"]

_AUDIT_NAMES = {"membership": "membership inference", "lira": "LiRA membership inference"}


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    for row in reversed(history):
        v = _num(row.get(key))
        if v is not None:
            return v
    return None


def leakage_clauses(entry: Entry) -> list[str]:
    """What the audits and leakage measures found: ``label leakage AUC 0.57``,
    ``membership inference AUC 0.51``, ``gradient inversion recovered 3 of 10 clients'
    inputs``, ``canary audit measures ε ≥ 0.8``; audits that were skipped say nothing."""
    out = []
    label = [v for k in ("leak/label_auc_norm", "leak/label_auc_direction")
             if (v := _last(entry.history, k)) is not None]
    if label:
        out.append(f"label leakage AUC {max(label):.2f}")
    for name, audit in sorted(entry.audit.items()):
        if not isinstance(audit, Mapping) or "skipped" in audit:
            continue
        auc = _num(audit.get("auc"))
        bound = _num(audit.get("eps_lower_bound"))
        if bound is not None:
            out.append(f"canary audit measures ε ≥ {bound:.2g}")
        elif auc is not None:
            out.append(f"{_AUDIT_NAMES.get(name, name)} AUC {auc:.2f}")
        elif name == "inversion":
            exposed, attacked = (_num(audit.get(k)) for k in ("clients_exposed",
                                                                "clients_attacked"))
            if exposed is not None and attacked is not None:
                out.append(f"gradient inversion recovered {fmt_count(exposed)} of "
                           f"{fmt_count(attacked)} clients' inputs")
    return out


def _dp(entry: Entry) -> str:
    eps = entry.figures.get("epsilon")
    return "" if eps is None else f" with DP at ε = {eps:.3g}"


def _change(entry: Entry, base: Entry, data: ReportData) -> str | None:
    """``costs 4.1 points of accuracy (0.919 against 0.960)`` or, for an error metric,
    ``raises rmse from 20.1 to 23.4``; ``None`` when either figure is missing."""
    got, ref = entry.figures.get("accuracy"), base.figures.get("accuracy")
    if got is None or ref is None:
        return None
    p = metric_label(data.primary)
    if data.lower_is_better:
        if math.isclose(got, ref, rel_tol=1e-3):
            return f"matches its {p} ({got:.4g})"
        verb = "raises" if got > ref else "lowers"
        return f"{verb} {p} from {ref:.4g} to {got:.4g}"
    points = round((ref - got) * 100, 1)
    pair = f"({got:.3f} against {ref:.3f})"
    if points > 0:
        return f"costs {points:.1f} points of {p} {pair}"
    if points < 0:
        return f"gains {-points:.1f} points of {p} {pair}"
    return f"matches its {p} {pair}"


def _bytes(entry: Entry, base: Entry) -> str | None:
    got, ref = entry.figures.get("bytes_total"), base.figures.get("bytes_total")
    if got is None or ref is None or ref <= 0:
        return None
    return f"moves {fmt_ratio(got / ref)} the bytes of {base.name}"


def _worst(entry: Entry, data: ReportData) -> str | None:
    worst = entry.figures.get("accuracy_worst_client")
    if worst is None:
        return None
    return f"its worst client reaches {metric_label(data.primary)} {worst:.3f}"


def entry_sentence(entry: Entry, data: ReportData) -> str:
    """The reading of one finished entry: against the baseline when there is one (and it is
    not the baseline), else its own figures."""
    base = data.baseline_of(entry)
    head = f"{entry.name}{_dp(entry)}"
    main: list[str] = []
    if base is not None and entry is not base:
        main = [c for c in (_change(entry, base, data), _bytes(entry, base)) if c]
    if not main:
        acc, rounds = entry.figures.get("accuracy"), entry.figures.get("rounds")
        own = []
        if acc is not None:
            own.append(f"reaches {metric_label(data.primary)} {acc:.3f}"
                       + ("" if rounds is None else f" in {fmt_count(rounds)} rounds"))
        if entry.figures.get("bytes_total") is not None:
            own.append(f"moves {fmt_bytes(entry.figures['bytes_total'])}")
        main = own or ["has no figures measured"]
        if entry is base:
            head += " (the pooled-data baseline)"
    sentence = f"{head} {' and '.join(main)}"
    rest = [c for c in (_worst(entry, data), *leakage_clauses(entry)) if c]
    if rest:
        sentence += "; " + "; ".join(rest)
    return sentence + "."


def spread_sentences(data: ReportData) -> list[str]:
    """A run of several seeds: each paradigm's headline figure (the mean of its last
    evaluations, :mod:`shoal.seeds`) across the seeds — mean ± sample std, min to max."""
    out = []
    label = metric_label(data.primary)
    for name, p in data.spread.items():
        m = (_mapping_of(p).get("metrics") or {}).get(data.primary)
        fw = _mapping_of(_mapping_of(m).get("final_window"))
        mean, std = _num(fw.get("mean")), _num(fw.get("std"))
        lo, hi = _num(fw.get("min")), _num(fw.get("max"))
        if mean is None:
            continue
        n = len(fw.get("per_seed") or [])
        text = f"Across {n} seeds, {name} reaches {label} {mean:.3f}"
        if std is not None:
            text += f" ± {std:.3f}"
        if lo is not None and hi is not None:
            text += f" (from {lo:.3f} to {hi:.3f})"
        out.append(text + ", the mean of each seed's last evaluations.")
    return out


def _mapping_of(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def reading(data: ReportData) -> list[str]:
    """The reading of a run or comparison, a sentence at a time: the baseline first, then
    each finished entry in order (each against the baseline of its own seed, in a run of
    several seeds), then the best of a comparison or the spread across seeds, then what did
    not finish."""
    base = data.baseline
    done = [e for e in data.entries if e.finished]
    order = ([base] if base is not None else []) + [e for e in done if e is not base]
    if data.kind == "seeds":  # seed by seed, each seed's baseline first
        order = sorted(done, key=lambda e: (e.seed, e.paradigm != "centralized"))
    out = [entry_sentence(e, data) for e in order]
    out += spread_sentences(data)
    rated = [e for e in done if e.figures.get("accuracy") is not None]
    if len(done) >= 3 and rated and data.kind != "seeds":
        pick = min if data.lower_is_better else max
        best = pick(rated, key=lambda e: e.figures["accuracy"])
        line = f"Best {metric_label(data.primary)}: {best.name} ({best.figures['accuracy']:.3f})"
        private = [e for e in rated if e.figures.get("epsilon") is not None]
        if private:
            best_dp = pick(private, key=lambda e: e.figures["accuracy"])
            line += (f"; best with DP: {best_dp.name} ({best_dp.figures['accuracy']:.3f} at "
                     f"ε = {best_dp.figures['epsilon']:.3g})")
        costed = [e for e in done if e.figures.get("bytes_total") is not None]
        if costed:
            light = min(costed, key=lambda e: e.figures["bytes_total"])
            line += f"; fewest bytes: {light.name} ({fmt_bytes(light.figures['bytes_total'])})"
        out.append(line + ".")
    unfinished = [e for e in data.entries if not e.finished]
    if unfinished:
        out.append("Not finished, so not read: " + ", ".join(
            f"{e.name} ({e.status}{': ' + e.reason if e.reason else ''})" for e in unfinished)
            + ".")
    return out
