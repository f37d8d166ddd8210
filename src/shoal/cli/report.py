"""``shoal report DIR [--out FILE]``: the HTML report of a run (of one seed or several) or a comparison.

Writes one self-contained HTML file (plots, tables and a plain-language reading; no network
needed to view it), by default ``DIR/report.html``, and prints the reading and the file's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import app, console

__all__ = ["report_command"]


@app.command("report")
def report_command(
    directory: Annotated[Path, typer.Argument(
        help="A run directory (shoal run --out DIR) or a comparison directory (shoal compare).")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where to write the HTML file (default: DIR/report.html).")] = None,
    trust_code: Annotated[bool, typer.Option(
        "--trust-code", help="Rebuild a task the directory's config names as code "
        "(task.name = \"module:factory\"), for the per-client plot: this imports and runs "
        "that code, so only for a directory you trust.")] = False,
) -> None:
    """Write the HTML report of a run (one seed or several) or comparison: accuracy, loss, ε,
    per-client accuracy, bytes, privacy-utility and audit ROC plots, the tables, and a
    plain-language reading."""
    from ..report import load_report, reading, write_page

    data = load_report(directory, trust_code=trust_code)
    path = write_page(data, out if out is not None else directory / "report.html")
    for sentence in reading(data):
        console.print(escape(sentence), soft_wrap=True)
    console.print(f"report written to {escape(str(path))}")
