"""The dashboard's page: one self-contained HTML document (no external script, style, font or
image, so it works offline), with a Content-Security-Policy that allows exactly its own inline
script and style and connections to its own origin.

The script opens ``/events`` (server-sent events; the browser reconnects by itself) and redraws
the page from each snapshot: run status and round progress, ε spent, connected nodes, the
latest round's metrics, a line chart of one metric over the rounds (a canvas drawn from the
data), recent dropouts and the last rounds. Every text from the run (metric names, node ids,
reasons) is inserted with ``textContent``, never as HTML.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
header{background:#1d3557;color:#fff;padding:10px 18px;display:flex;gap:16px;align-items:center}
header h1{font-size:18px;margin:0;flex:1}
#conn{font-size:12px;padding:2px 8px;border-radius:10px;background:#6c757d}
#conn.live{background:#2a9d8f}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:14px;padding:14px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:10px 14px}
h2{font-size:14px;margin:0 0 8px;color:#457b9d;text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
td,th{text-align:left;padding:2px 6px;border-bottom:1px solid #eef0f3;font-size:13px}
td.v{text-align:right}
progress{width:100%;height:14px}
.big{font-size:22px;font-weight:600}
.muted{color:#6c757d;font-size:12px}
.bad{color:#c1121f}
canvas{width:100%;height:220px}
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e15) return String(v);
  const a = Math.abs(v);
  return (a !== 0 && (a < 1e-3 || a >= 1e6)) ? v.toExponential(4) : v.toFixed(4);
}
function rows(tbody, list) {
  tbody.replaceChildren(...list);
}
let last = null;
let chosen = null;
function pickMetric(keys) {
  if (chosen && keys.includes(chosen)) return chosen;
  for (const k of ["central/accuracy", "central/rmse", "central/loss", "train/loss"])
    if (keys.includes(k)) return k;
  return keys.find((k) => k.startsWith("central/")) || keys[0] || null;
}
function drawChart(state) {
  const canvas = $("chart");
  const rounds = state.rounds || [];
  const keys = [...new Set(rounds.flatMap((r) => Object.keys(r.metrics)))]
    .filter((k) => k !== "round").sort();
  const sel = $("metric");
  const current = [...sel.options].map((o) => o.value);
  if (current.join("\\n") !== keys.join("\\n"))
    sel.replaceChildren(...keys.map((k) => { const o = el("option", k); o.value = k; return o; }));
  const key = pickMetric(keys);
  if (key) sel.value = key;
  const pts = rounds.filter((r) => key && typeof r.metrics[key] === "number")
    .map((r) => [r.round, r.metrics[key]]);
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 400, h = canvas.clientHeight || 220;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  g.font = "11px system-ui,sans-serif";
  g.fillStyle = "#6c757d";
  if (!pts.length) { g.fillText("no data yet", 10, 20); return; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const L = 54, R = 10, T = 10, B = 24;
  const X = (x) => L + (x - x0) / (x1 - x0) * (w - L - R);
  const Y = (y) => h - B - (y - y0) / (y1 - y0) * (h - T - B);
  g.strokeStyle = "#dde1e6"; g.beginPath();
  g.moveTo(L, T); g.lineTo(L, h - B); g.lineTo(w - R, h - B); g.stroke();
  g.fillText(fmt(y1), 2, T + 8); g.fillText(fmt(y0), 2, h - B);
  g.fillText("round " + x0, L, h - 6);
  g.fillText(String(x1), w - R - 24, h - 6);
  g.strokeStyle = "#e76f51"; g.lineWidth = 2; g.beginPath();
  pts.forEach((p, i) => (i ? g.lineTo(X(p[0]), Y(p[1])) : g.moveTo(X(p[0]), Y(p[1]))));
  g.stroke();
  g.fillStyle = "#e76f51";
  for (const p of pts) { g.beginPath(); g.arc(X(p[0]), Y(p[1]), 2.5, 0, 7); g.fill(); }
}
function render(state) {
  last = state;
  const run = state.run;
  document.title = state.title + " dashboard";
  $("title").textContent = state.title + (run.label ? " · " + run.label : "");
  let status = run.status;
  if (run.status === "idle") status = "waiting for the run to start";
  if (run.status === "running")
    status = run.current ? "round " + run.current + " running"
      : run.done ? "running" : "waiting for the first round (" + state.nodes.connected
        + " connected)";
  if (run.status === "stopped" && run.stopped) status = "stopped: " + run.stopped;
  $("status").textContent = status;
  $("status").className = run.status === "stopped" ? "bad" : "";
  $("progress").max = Math.max(run.rounds, 1);
  $("progress").value = run.done;
  $("rounds-done").textContent = run.done + " / " + run.rounds + " rounds";
  $("info").textContent = Object.entries(run.info || {}).map(([k, v]) => k + ": " + v).join(" · ");
  const p = state.privacy;
  $("epsilon").textContent = p.epsilon === null ? "no DP" : "ε = " + fmt(p.epsilon);
  $("privacy-detail").textContent = [
    p.delta !== null ? "δ = " + fmt(p.delta) : "",
    p.budget !== null ? "budget ε = " + fmt(p.budget) : ""].filter(Boolean).join(" · ");
  const n = state.nodes;
  $("nodes-title").textContent = run.role || "nodes";
  $("nodes-connected").textContent = n.connected + " connected";
  $("nodes-extra").textContent = n.untracked ? "+" + n.untracked + " more not listed" : "";
  rows($("nodes").tBodies[0], n.list.map((x) => {
    const tr = el("tr"); tr.dataset.node = x.id;
    tr.append(el("td", x.id), el("td", x.connected ? "connected" : "not connected",
      x.connected ? "" : "muted"), el("td", x.dropped, "v"),
      el("td", x.last_dropped === null ? "" : "round " + x.last_dropped + ": " + x.reason));
    return tr;
  }));
  const lastRound = state.rounds.length ? state.rounds[state.rounds.length - 1] : null;
  $("metrics-round").textContent = lastRound ? "round " + lastRound.round : "no round yet";
  rows($("metrics").tBodies[0], lastRound ? Object.entries(lastRound.metrics)
    .filter(([k]) => k !== "round").map(([k, v]) => {
      const tr = el("tr"); tr.dataset.metric = k;
      tr.append(el("td", k), el("td", fmt(v), "v"));
      return tr;
    }) : []);
  rows($("dropouts").tBodies[0], state.dropouts.slice().reverse().map((d) => {
    const tr = el("tr");
    tr.append(el("td", d.round, "v"), el("td", d.node), el("td", d.reason));
    return tr;
  }));
  rows($("rounds").tBodies[0], state.rounds.slice(-25).reverse().map((r) => {
    const m = r.metrics, key = pickMetric(Object.keys(m));
    const tr = el("tr"); tr.dataset.round = r.round;
    const replied = "round/replied" in m ? fmt(m["round/replied"]) + "/" +
      fmt(m["round/sampled"]) : "";
    tr.append(el("td", r.round, "v"), el("td", replied, "v"),
      el("td", key ? key + " " + fmt(m[key]) : ""),
      el("td", "dp/epsilon" in m ? fmt(m["dp/epsilon"]) : "", "v"),
      el("td", r.failed ? "failed: " + r.failed : "", "bad"));
    return tr;
  }));
  $("finished").textContent = (state.finished || []).map((f) => f.label + ": " + f.rounds +
    " rounds" + Object.entries(f.final).map(([k, v]) => ", " + k + " " + fmt(v)).join(""))
    .join(" | ");
  $("version").textContent = "update " + state.version;
  drawChart(state);
}
$("metric").addEventListener("change", (e) => { chosen = e.target.value; if (last) drawChart(last); });
window.addEventListener("resize", () => { if (last) drawChart(last); });
function connect() {
  const source = new EventSource("events");
  source.addEventListener("state", (e) => {
    $("conn").textContent = "live"; $("conn").className = "live";
    render(JSON.parse(e.data));
  });
  source.addEventListener("end", () => {
    $("conn").textContent = "dashboard closed"; $("conn").className = "";
    source.close();
  });
  source.onerror = () => { $("conn").textContent = "reconnecting…"; $("conn").className = ""; };
}
connect();
"""

_BODY = """
<header><h1 id="title">shoal</h1><span id="version" class="muted"></span>
<span id="conn">connecting…</span></header>
<main>
<section><h2>Run</h2><div id="status" class="big">waiting</div>
<progress id="progress" value="0" max="1"></progress>
<div id="rounds-done" class="muted"></div><div id="info" class="muted"></div>
<div id="finished" class="muted"></div></section>
<section><h2>Privacy spent</h2><div id="epsilon" class="big">no DP</div>
<div id="privacy-detail" class="muted"></div></section>
<section><h2 id="nodes-title">nodes</h2><div id="nodes-connected" class="big">0 connected</div>
<div id="nodes-extra" class="muted"></div>
<table id="nodes"><thead><tr><th>id</th><th>status</th><th>dropped</th><th>last dropout</th>
</tr></thead><tbody></tbody></table></section>
<section><h2>Metrics <span id="metrics-round" class="muted"></span></h2>
<table id="metrics"><tbody></tbody></table></section>
<section><h2>Over the rounds</h2><select id="metric"></select>
<canvas id="chart"></canvas></section>
<section><h2>Dropouts</h2><table id="dropouts"><thead><tr><th>round</th><th>node</th>
<th>reason</th></tr></thead><tbody></tbody></table></section>
<section><h2>Last rounds</h2><table id="rounds"><thead><tr><th>round</th><th>replied</th>
<th>metric</th><th>ε</th><th></th></tr></thead><tbody></tbody></table></section>
</main>
"""


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


PAGE = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>shoal dashboard</title><style>{_STYLE}</style></head>"
        f"<body>{_BODY}<script>{_SCRIPT}</script></body></html>\n")
"""The page (HTML with its inline style and script)."""

CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'")
"""Only the page's own script and style run, and it connects only to its own origin."""
