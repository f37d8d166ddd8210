"""The report of a run, a run of several seeds, or a comparison: one self-contained HTML file
with plots, tables and a short plain-language reading of the result (``shoal report DIR``).

* :mod:`~shoal.report.read` loads a run directory or a comparison directory;
* :mod:`~shoal.report.plots` builds the plotly figures (or says why one has no data);
* :mod:`~shoal.report.tables` and :mod:`~shoal.report.reading` write the tables and the reading;
* :mod:`~shoal.report.html` assembles the page and writes it.
"""

from __future__ import annotations

from .html import render_report, write_page, write_report
from .plots import Plot, build_plots
from .read import FIGURES, Entry, ReportData, load_report
from .reading import entry_sentence, reading
from .tables import Table, audit_table, figures_table

__all__ = ["FIGURES", "Entry", "Plot", "ReportData", "Table", "audit_table", "build_plots",
           "entry_sentence", "figures_table", "load_report", "reading", "render_report",
           "write_page", "write_report"]
