"""The report's plotly figures, each built from the loaded data or left out with a reason.

Every plot is a :class:`Plot`: a plotly figure, or ``None`` and a one-line note saying why
there is nothing to draw ("no DP in this run: no ε curve"). A plot is never drawn empty. The
entries keep one colour across all the plots, so a paradigm is recognised at a glance.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from .fmt import metric_label
from .read import Entry, ReportData

__all__ = ["EPSILON_KEYS", "Plot", "build_plots", "curve", "epsilon_curve", "examples_seen",
           "roc_points"]

EPSILON_KEYS = ("dp/epsilon", "privacy/epsilon")
"""The per-round metric keys that carry the ε spent so far (the first one present is used)."""

HEIGHT = 440


@dataclass(frozen=True)
class Plot:
    """One plot of the report: ``key`` (the HTML id), ``title``, a short ``caption`` saying
    how to read it, and either ``figure`` or, when there is no data, ``note`` saying why."""

    key: str
    title: str
    caption: str
    figure: go.Figure | None = None
    note: str = ""


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def curve(history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(rounds, values)`` of metric ``key`` over the rounds that measured it (NaN and
    missing rounds are skipped, not drawn as zero)."""
    xs: list[int] = []
    ys: list[float] = []
    for i, row in enumerate(history, start=1):
        y = _finite(row.get(key))
        if y is not None:
            xs.append(int(row.get("round", i)))
            ys.append(y)
    return xs, ys


def epsilon_curve(history: Sequence[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """``(rounds, ε)`` from the first of :data:`EPSILON_KEYS` the history carries."""
    for key in EPSILON_KEYS:
        xs, ys = curve(history, key)
        if xs:
            return xs, ys
    return [], []


def _bytes_curve(history: Sequence[dict[str, Any]]) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    for i, row in enumerate(history, start=1):
        parts = [_finite(row.get(f"comm/bytes_{d}")) for d in ("up", "down", "peer")]
        if any(p is not None for p in parts):
            xs.append(int(row.get("round", i)))
            ys.append(math.fsum(p for p in parts if p is not None))
    return xs, ys


def _label(text: str) -> str:
    """A text from the directory as plotly shows it: plotly reads a subset of HTML in labels
    and decodes entities, so escaping keeps a name like ``<b>x`` literal and harmless; ``%``
    would start a hover-template field."""
    return html.escape(text, quote=False).replace("%", "&#37;")


def _rounds_axis(fig: go.Figure, data: ReportData) -> None:
    """Whole rounds on the x axes (no "round 1.5")."""
    last = max((int(row.get("round", i)) for e in data.entries
                for i, row in enumerate(e.history, start=1)), default=1)
    fig.update_xaxes(tick0=1, dtick=max(1, math.ceil(last / 10)))


def _colours(entries: Sequence[Entry]) -> dict[str, str]:
    palette = qualitative.Plotly + qualitative.D3
    return {e.name: palette[i % len(palette)] for i, e in enumerate(entries)}


def _layout(fig: go.Figure, **kw: Any) -> go.Figure:
    settings: dict[str, Any] = dict(template="plotly_white", height=HEIGHT,
                                    margin=dict(l=60, r=20, t=60, b=50),
                                    legend=dict(orientation="h", yanchor="bottom", y=1.04, x=0))
    fig.update_layout(**{**settings, **kw})
    return fig


def _none(data: ReportData, what: str) -> str:
    """'no DP in this run' / 'no variant used DP' style openings of a note."""
    return f"no {what} in this run" if data.kind == "run" else f"no variant has {what}"


# -- the plots --------------------------------------------------------------------------------

def examples_seen(history: Sequence[dict[str, Any]]) -> dict[int, float] | None:
    """Round -> training examples seen up to and including it (``train/examples`` summed),
    or ``None`` when a round did not count them (distributed DP hides the count)."""
    seen: dict[int, float] = {}
    total = 0.0
    for i, row in enumerate(history, start=1):
        n = _finite(row.get("train/examples"))
        if n is None:
            return None
        total += n
        seen[int(row.get("round", i))] = total
    return seen or None


def _progress(data: ReportData, colour: dict[str, str]) -> Plot:
    metric, p = data.primary, metric_label(data.primary)
    title = f"{p} and loss per round"
    caption = (f"{p} and loss of the global model on the central test set after each round "
               "(solid), and the training loss (dotted); all paradigms share the axes. The "
               "buttons switch the x axis between rounds and training examples seen (a "
               "comparison gives every paradigm the same number of examples).")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=(f"{p} (test set)", "loss"))
    by_examples: list[list[float]] | None = []
    for e in data.entries:
        first = True
        seen = examples_seen(e.history)
        for row, key, dash, label in ((1, f"central/{metric}", "solid", _label(e.name)),
                                      (2, "central/loss", "solid", _label(f"{e.name} test loss")),
                                      (2, "train/loss", "dot",
                                       _label(f"{e.name} training loss"))):
            xs, ys = curve(e.history, key)
            if not xs:
                continue
            if by_examples is not None:
                by_examples = None if seen is None else [*by_examples, [seen[x] for x in xs]]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=_label(e.name),
                                     legendgroup=e.name, showlegend=first,
                                     hovertemplate=f"{label}<br>%{{x}}: %{{y:.4g}}"
                                                   "<extra></extra>",
                                     line=dict(color=colour[e.name], dash=dash)), row=row, col=1)
            first = False
    if not fig.data:
        return Plot("progress", title, caption,
                    note=f"{_none(data, 'per-round evaluation')}: no {p} or loss curve.")
    fig.update_xaxes(title_text="round", row=2, col=1)
    _rounds_axis(fig, data)
    if by_examples is None:
        caption = caption[:caption.index(" The buttons")]
    else:
        rounds = [list(t.x) for t in fig.data]
        tick = fig.layout.xaxis.dtick
        fig.update_layout(updatemenus=[dict(
            type="buttons", direction="right", x=1, xanchor="right", y=1.04, yanchor="bottom",
            showactive=True, buttons=[
                dict(label="by round", method="update",
                     args=[{"x": rounds}, {"xaxis2.title.text": "round",
                                           "xaxis.dtick": tick, "xaxis2.dtick": tick}]),
                dict(label="by examples seen", method="update",
                     args=[{"x": by_examples}, {"xaxis2.title.text": "training examples seen",
                                                "xaxis.dtick": None, "xaxis2.dtick": None}]),
            ])])
    return Plot("progress", title, caption,
                _layout(fig, height=HEIGHT + 200, margin=dict(l=60, r=20, t=90, b=50)))


def _epsilon(data: ReportData, colour: dict[str, str]) -> Plot:
    title = "privacy spent (ε) per round"
    caption = ("ε after each round, at the run's δ: lower is more private. It only grows; a "
               "run that stopped at a privacy budget ends where its line ends.")
    fig = go.Figure()
    for e in data.entries:
        xs, ys = epsilon_curve(e.history)
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=_label(e.name),
                                     line=dict(color=colour[e.name])))
    if not fig.data:
        return Plot("epsilon", title, caption, note=f"{_none(data, 'DP')}: no ε curve.")
    _rounds_axis(fig, data)
    return Plot("epsilon", title, caption,
                _layout(fig, xaxis_title="round", yaxis_title="ε"))


def _clients(data: ReportData, colour: dict[str, str]) -> Plot:
    metric, p = data.primary, metric_label(data.primary)
    tail = "90th percentile" if data.lower_is_better else "10th percentile"
    title = f"per-client {p}"
    caption = ("each client tests the final model on its own held-out data: one dot per "
               "client, the box spanning the middle half of the clients; the open square is "
               "the central test set. A wide spread means the model serves some clients much "
               "worse than others.")
    fig = go.Figure()
    marks = (("worst client", "accuracy_worst_client", "x"),
             (tail, "accuracy_p10", "diamond"),
             ("client mean", None, "circle"))
    shown: set[str] = set()
    summarised: list[str] = []
    rows = 0
    for e in data.entries:
        name = _label(e.name)
        if e.clients:
            ids = sorted(e.clients)
            fig.add_trace(go.Box(x=[e.clients[c] for c in ids], y=[name] * len(ids),
                                 name=name, orientation="h", boxpoints="all", jitter=0.5,
                                 pointpos=0, text=[_label(c) for c in ids],
                                 hovertemplate="%{text}: %{x:.4g}<extra></extra>",
                                 marker=dict(color=colour[e.name], size=6),
                                 line=dict(color=colour[e.name]), showlegend=False))
        else:
            values = {label: (_finite(e.final.get(f"fed_eval/{metric}")) if key is None
                              else e.figures.get(key)) for label, key, _ in marks}
            if values["worst client"] is None and values[tail] is None:
                continue
            summarised.append(e.name)
            for label, _, symbol in marks:
                v = values[label]
                if v is None:
                    continue
                fig.add_trace(go.Scatter(x=[v], y=[name], mode="markers", name=label,
                                         legendgroup=label, showlegend=label not in shown,
                                         marker=dict(symbol=symbol, size=12,
                                                     color=colour[e.name])))
                shown.add(label)
        rows += 1
        central = e.figures.get("accuracy")
        if central is not None:
            fig.add_trace(go.Scatter(x=[central], y=[name], mode="markers",
                                     name="central test set", legendgroup="central",
                                     showlegend="central" not in shown,
                                     marker=dict(symbol="square-open", size=13,
                                                 color=colour[e.name], line=dict(width=2))))
            shown.add("central")
    if not rows:
        whys = sorted({e.clients_why for e in data.entries if e.clients_why})
        return Plot("clients", title, caption,
                    note=f"{_none(data, 'per-client evaluation')}: no per-client {p}"
                         + (f" ({'; '.join(whys)})." if whys else "."))
    if summarised:
        why = "; ".join(f"{e.name}: {e.clients_why}" for e in data.entries
                        if e.name in summarised and e.clients_why)
        caption += (f" For {', '.join(summarised)} only the worst client, the {tail} and the "
                    f"mean the run recorded are shown" + (f" ({why})." if why else "."))
    return Plot("clients", title, caption,
                _layout(fig, height=max(280, 130 + 70 * rows), xaxis_title=p,
                        yaxis=dict(type="category", autorange="reversed")))


def _bytes(data: ReportData, colour: dict[str, str]) -> Plot:
    title = "bytes per round and cumulative"
    caption = ("bytes on the wire in each round (up, down and between peers, federated "
               "evaluation included) and their running total: what each paradigm costs the "
               "network.")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("per round", "cumulative"))
    for e in data.entries:
        xs, ys = _bytes_curve(e.history)
        if not xs:
            continue
        total, cum = 0.0, []
        for y in ys:
            total += y
            cum.append(total)
        for col, values, show in ((1, ys, True), (2, cum, False)):
            fig.add_trace(go.Scatter(x=xs, y=values, mode="lines+markers", name=_label(e.name),
                                     legendgroup=e.name, showlegend=show,
                                     line=dict(color=colour[e.name])), row=1, col=col)
    if not fig.data:
        return Plot("bytes", title, caption,
                    note=f"{_none(data, 'traffic counted')}: no bytes curve.")
    fig.update_xaxes(title_text="round")
    _rounds_axis(fig, data)
    fig.update_yaxes(title_text="bytes", row=1, col=1)
    return Plot("bytes", title, caption, _layout(fig))


def _privacy_utility(data: ReportData, colour: dict[str, str]) -> Plot:
    metric, p = data.primary, metric_label(data.primary)
    title = f"privacy–utility: {p} against ε"
    caption = (f"each DP run's {p} against the ε it had spent, round by round (the large "
               "marker: the final figures); dashed lines: runs without DP, which give no "
               "formal guarantee (ε = ∞). "
               + ("Down" if data.lower_is_better else "Up") + " and to the left is better.")
    fig = go.Figure()
    for e in data.entries:
        eps_x, eps = epsilon_curve(e.history)
        acc_x, acc = curve(e.history, f"central/{metric}")
        at = dict(zip(acc_x, acc, strict=True))
        pts = [(x, at[r]) for r, x in zip(eps_x, eps, strict=True) if r in at]
        if pts:
            fig.add_trace(go.Scatter(x=[x for x, _ in pts], y=[y for _, y in pts],
                                     mode="lines+markers", name=_label(e.name), legendgroup=e.name,
                                     line=dict(color=colour[e.name])))
        final_eps, final_acc = e.figures.get("epsilon"), e.figures.get("accuracy")
        if final_eps is not None and final_acc is not None:
            fig.add_trace(go.Scatter(x=[final_eps], y=[final_acc], mode="markers",
                                     name=_label(f"{e.name} (final)"), legendgroup=e.name,
                                     showlegend=not pts,
                                     marker=dict(size=16, color=colour[e.name])))
    if not fig.data:
        return Plot("privacy_utility", title, caption,
                    note=f"{_none(data, 'DP')}: no privacy–utility curve.")
    for e in data.entries:
        level = e.figures.get("accuracy")
        if e.finished and level is not None and e.figures.get("epsilon") is None \
                and not epsilon_curve(e.history)[0]:
            fig.add_hline(y=level, line=dict(color=colour[e.name], dash="dash"),
                          annotation_text=_label(f"{e.name} (no DP)"), annotation_position="top left")
    return Plot("privacy_utility", title, caption, _layout(fig, xaxis_title="ε", yaxis_title=p))


def roc_points(audit: Any) -> tuple[list[float], list[float]] | None:
    """An audit's ``roc`` as ``(fpr, tpr)``, if it holds two equal-length lists of numbers."""
    roc = audit.get("roc") if isinstance(audit, dict) else None
    if not isinstance(roc, dict):
        return None
    fpr, tpr = roc.get("fpr"), roc.get("tpr")
    if not isinstance(fpr, list) or not isinstance(tpr, list) or len(fpr) != len(tpr) \
            or len(fpr) < 2:
        return None
    xs, ys = [_finite(v) for v in fpr], [_finite(v) for v in tpr]
    if any(v is None for v in xs + ys):
        return None
    return [float(v) for v in xs if v is not None], [float(v) for v in ys if v is not None]


def _roc(data: ReportData, colour: dict[str, str]) -> Plot:
    title = "audit ROC curves"
    caption = ("how well each audit's attacker tells members (training examples) from "
               "non-members: true against false positive rate. The diagonal is guessing; a "
               "curve far above it, or a high true positive rate at a low false positive rate, "
               "means the model leaks.")
    fig = go.Figure()
    dashes = ("solid", "dash", "dot", "dashdot")
    for e in data.entries:
        for i, (name, audit) in enumerate(sorted(e.audit.items())):
            pts = roc_points(audit)
            if pts is None:
                continue
            auc = _finite(audit.get("auc"))
            label = _label(f"{e.name} {name}" + ("" if auc is None else f" (AUC {auc:.3f})"))
            fig.add_trace(go.Scatter(x=pts[0], y=pts[1], mode="lines", name=label,
                                     line=dict(color=colour[e.name], dash=dashes[i % 4])))
    if not fig.data:
        audited = any(e.audit for e in data.entries)
        why = ("its audits recorded no ROC points" if audited
               else "no audit ran (`shoal audit DIR` runs them)")
        return Plot("roc", title, caption, note=f"{why}: no ROC curve.")
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="guessing",
                             line=dict(color="#999", dash="dash")))
    return Plot("roc", title, caption,
                _layout(fig, xaxis_title="false positive rate", yaxis_title="true positive rate",
                        xaxis=dict(range=[0, 1]), yaxis=dict(range=[0, 1.02])))


def build_plots(data: ReportData) -> list[Plot]:
    """Every plot of the report, in page order; those without data carry a note instead."""
    colour = _colours(data.entries)
    return [build(data, colour) for build in (_progress, _epsilon, _clients, _bytes,
                                               _privacy_utility, _roc)]
