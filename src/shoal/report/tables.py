"""The report's tables, as plain text cells (the page escapes them): the figures of every
entry side by side, and what each audit found."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .fmt import DASH, fmt_bytes, fmt_count, fmt_number, fmt_seconds, metric_label
from .read import ReportData

__all__ = ["Table", "audit_table", "figures_table"]


@dataclass(frozen=True)
class Table:
    """A titled table of text cells; ``notes`` are shown under it."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: str = ""


def figures_table(data: ReportData) -> Table:
    """One row per entry: its primary metric (central, worst client, tail), ε and what it
    protects, bytes per participant and in total, wall time, compute per participant, rounds,
    examples seen and why it stopped early."""
    p = metric_label(data.primary)
    tail = "p90" if data.lower_is_better else "p10"
    comparison = data.kind == "comparison"
    headers = (["variant", "paradigm", "status"] if comparison else ["paradigm"]) + [
        p, "worst client", tail, "ε", "protects", "bytes / participant", "bytes total",
        "wall time", "compute / participant", "rounds", "examples", "stopped early"] + (
        ["why not finished"] if comparison else [])
    rows = []
    for e in data.entries:
        f = e.figures
        rows.append(([e.name, e.paradigm, e.status] if comparison else [e.name]) + [
            fmt_number(f["accuracy"]), fmt_number(f["accuracy_worst_client"]),
            fmt_number(f["accuracy_p10"]), fmt_number(f["epsilon"], ".3g"),
            f["protects"] or DASH, fmt_bytes(f["bytes_per_participant"]),
            fmt_bytes(f["bytes_total"]), fmt_seconds(f["seconds"]),
            fmt_seconds(f["compute_s_per_participant"]), fmt_count(f["rounds"]),
            fmt_count(f["examples"]), f["stopped"] or DASH] + (
                [e.reason or DASH] if comparison else []))
    notes = (f"{p}: on the central test set after the last round. worst client, {tail}: each "
             "client tests the final model on its own held-out data (the run's federated "
             "evaluation; where it ran none, the report's evaluation of the final model). "
             "ε at the run's δ. bytes / participant: sent plus received, mean over the "
             f"participants. {DASH}: not measured.")
    return Table("figures", headers, rows, notes)


def _audit_cells(name: str, audit: Mapping[str, Any]) -> list[str]:
    if "skipped" in audit:
        return [str(audit.get("attack", name)), DASH, DASH, DASH, f"skipped: {audit['skipped']}"]
    detail = ""
    if name == "inversion":
        detail = (f"{fmt_count(audit.get('clients_exposed'))} of "
                  f"{fmt_count(audit.get('clients_attacked'))} clients' inputs recovered from "
                  f"{fmt_count(audit.get('updates_attacked'))} updates")
    elif "members" in audit:
        detail = (f"{fmt_count(audit.get('members'))} members, "
                  f"{fmt_count(audit.get('non_members'))} non-members")
    elif "eps_lower_bound" in audit:
        detail = (f"ε ≥ {fmt_number(audit.get('eps_lower_bound'), '.3g')} measured from "
                  f"{fmt_count(audit.get('canaries'))} canaries (accountant's ε "
                  f"{fmt_number(audit.get('eps_accountant'), '.3g')})")
    return [str(audit.get("attack", name)), fmt_number(audit.get("auc")),
            fmt_number(audit.get("tpr_at_1%_fpr")), fmt_number(audit.get("tpr_at_0.1%_fpr")),
            detail or DASH]


def audit_table(data: ReportData) -> Table | None:
    """One row per entry and audit (``audit.json``), or ``None`` when no audit ran."""
    rows = []
    for e in data.entries:
        for name, audit in sorted(e.audit.items()):
            if isinstance(audit, Mapping):
                rows.append([e.name, name, *_audit_cells(name, audit)])
    if not rows:
        return None
    return Table("audits", ["entry", "audit", "attack", "AUC", "TPR at 1 % FPR",
                            "TPR at 0.1 % FPR", "detail"], rows,
                 "AUC 0.5 and TPR equal to the FPR: the attacker does no better than guessing.")
