"""Assemble the report page and write it: one self-contained HTML file.

plotly.js is embedded once, inline, in the page's head, so the file opens without a network;
each plot is a ``<div>`` with its figure's data. Every text that comes from the directory (a
variant's name, an audit's note, the config) is escaped; the figures' data goes through
plotly's JSON encoder, which escapes ``</`` inside scripts. The file is written to a temporary
name beside the target and moved into place, so a reader never sees half a page.
"""

from __future__ import annotations

import html
import os
import tempfile
from pathlib import Path

from plotly.offline import get_plotlyjs

from ..errors import ShoalError
from .fmt import metric_label
from .plots import Plot, build_plots
from .read import ReportData, load_report
from .reading import reading
from .tables import Table, audit_table, figures_table

__all__ = ["render_report", "write_page", "write_report"]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2rem; } .where { color: #666; margin-top: 0; }
section { margin: 2rem 0; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.reading li { margin: .3rem 0; } .caption, .tnote { color: #555; font-size: .92rem; }
.note { color: #8a5a00; background: #fff8e6; border-left: 3px solid #e0a800;
        padding: .4rem .8rem; }
table { border-collapse: collapse; font-size: .9rem; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: .3rem .55rem; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } td.text { white-space: normal; min-width: 18rem; text-align: left; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: .8rem; overflow-x: auto; font-size: .85rem; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(t: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(
        f'<td class="text">{_e(c)}</td>' if len(c) > 28 else f"<td>{_e(c)}</td>" for c in row)
        + "</tr>" for row in t.rows)
    note = f'<p class="tnote">{_e(t.notes)}</p>' if t.notes else ""
    return (f'<section id="table-{_e(t.title)}"><h2>{_e(t.title)}</h2>'
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"
            "</section>")


def _plot(p: Plot) -> str:
    parts = [f'<section class="plot-section" id="section-{p.key}"><h2>{_e(p.title)}</h2>']
    if p.figure is None:
        parts.append(f'<p class="note" data-plot="{p.key}">{_e(p.note)}</p>')
    else:
        parts.append(f'<p class="caption">{_e(p.caption)}</p>')
        parts.append(p.figure.to_html(full_html=False, include_plotlyjs=False,
                                      div_id=f"plot-{p.key}",
                                      default_height=f"{p.figure.layout.height or 440}px",
                                      config={"displaylogo": False, "responsive": True}))
    parts.append("</section>")
    return "".join(parts)


def render_report(data: ReportData) -> str:
    """The whole page for loaded ``data``, as one HTML string (plotly.js inline)."""
    what = {"comparison": "comparison", "seeds": "run of several seeds"}.get(data.kind, "run")
    counted = {"comparison": "variants", "seeds": "runs"}.get(data.kind, "paradigms")
    sentences = "".join(f"<li>{_e(s)}</li>" for s in reading(data))
    audits = audit_table(data)
    body = [
        f"<h1>shoal report: {_e(data.path.name or data.path)}</h1>",
        # The directory's name only: the page is made to be shared, this machine's paths not.
        f'<p class="where">{what} directory {_e(data.path.resolve().name)} · '
        f"{len(data.entries)} {counted} · "
        f"judged by {_e(metric_label(data.primary))}</p>",
        f'<section class="reading" id="reading"><h2>reading</h2><ul>{sentences}</ul></section>',
        _table(figures_table(data)),
        *(_plot(p) for p in build_plots(data)),
        _table(audits) if audits is not None else "",
        f'<section id="config"><h2>config</h2><details><summary>the config'
        f"</summary><pre>{_e(data.config_text)}</pre></details></section>",
    ]
    # plotly.js is minified JavaScript that holds no "</script" (plotly inlines it the same way)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>shoal report: {_e(data.path.name or data.path)}</title>"
            f"<style>{_STYLE}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head>\n<body>'
            + "\n".join(body) + "\n</body></html>\n")


def write_page(data: ReportData, target: str | Path) -> Path:
    """Write the page of loaded ``data`` to ``target`` atomically (a temporary file beside it,
    then moved into place); return its path. Raises :class:`~shoal.errors.ShoalError` when
    ``target`` is a directory or cannot be written."""
    target = Path(target)
    if target.is_dir():
        raise ShoalError(f"shoal report: --out {target} is a directory; give a file name, "
                         f"e.g. {target / 'report.html'}.")
    if target.exists() and target.suffix.lower() not in (".html", ".htm"):
        raise ShoalError(f"shoal report: --out {target} exists and is not an HTML file; the "
                         "report would replace it (a run's summary.json, a config). Give a "
                         f"name ending in .html, e.g. {target.with_suffix('.html')}.")
    page = render_report(data)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(page)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise ShoalError(f"shoal report: cannot write {target} ({e.strerror or e}); choose "
                         "another place with --out.") from e
    return target


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of a run, several-seed run or comparison directory ``path``;
    return its path.

    ``out`` defaults to ``path/report.html``. The file is self-contained (it needs no network
    to view) and written atomically. Raises :class:`~shoal.errors.CheckpointError` when
    ``path`` is not a finished run, several-seed run or comparison directory, or a file in it
    is unreadable (the message names the file and how to fix it), and
    :class:`~shoal.errors.ShoalError` when ``out`` cannot be written.
    """
    data = load_report(path)
    return write_page(data, Path(out) if out is not None else Path(path) / "report.html")
