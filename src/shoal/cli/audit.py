"""``shoal audit RUN_DIR [--only inversion,membership,lira,epsilon]``: privacy audits of a finished run.

Reads the run's config, models and captured views (``[audit] capture_rounds``), writes
``RUN_DIR/audit.json`` and prints one line per paradigm and audit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import app, console

__all__ = ["audit_command"]


@app.command("audit")
def audit_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's directory.")],
    only: Annotated[str, typer.Option(
        help="Comma-separated audits to run (default: all): inversion, membership, lira, "
             "epsilon.")] = "",
    trust_code: Annotated[bool, typer.Option(
        "--trust-code", help="Rebuild a task the run's config names as code "
        "(task.name = \"module:factory\"): this imports and runs that code, so only for a "
        "run directory you trust.")] = False,
) -> None:
    """Audit what a finished run leaks: gradient inversion of the captured updates,
    membership inference (loss threshold, LiRA with shadow models) against the final model,
    and the one-run lower bound on ε from planted canaries; writes RUN_DIR/audit.json."""
    from ..audits.run_audit import audit_run

    results = audit_run(run_dir, [a for a in only.split(",") if a], trust_code=trust_code)
    for paradigm, audits in results.items():
        for name, figures in audits.items():
            if "skipped" in figures:
                line = f"skipped: {figures['skipped']}"
            elif name == "inversion":
                line = (f"{figures['clients_exposed']} of {figures['clients_attacked']} clients' "
                        f"inputs recovered exactly from {figures['updates_attacked']} updates "
                        f"the observer received ({figures['messages_by_kind']})")
            elif name == "epsilon":
                line = (f"{figures['verdict']} ({figures['correct']} of {figures['guesses']} "
                        f"guesses right on {figures['canaries']} canaries)")
            else:
                line = (f"{figures['attack']}: AUC {figures['auc']:.4f}, TPR "
                        f"{figures['tpr_at_1%_fpr']:.4f} at 1 % FPR, "
                        f"{figures['tpr_at_0.1%_fpr']:.4f} at 0.1 %")
            console.print(escape(f"{paradigm} {name}: {line}"), soft_wrap=True)
    console.print(f"written to {run_dir / 'audit.json'}")
