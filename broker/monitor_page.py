"""The web monitor's page: HTML, CSS and JavaScript inline, charts as inline SVG, nothing from elsewhere.

Every value from the broker is put into the page with textContent or as an
SVG attribute, never through innerHTML: job messages and site names are
written by others. The Content-Security-Policy (CSP) allows exactly this
page's script (by its SHA-256), its inline style, and requests to this
origin only.
"""

from __future__ import annotations

import base64
import hashlib

SCRIPT = r"""
"use strict";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const SVG = "http://www.w3.org/2000/svg";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function table(id, head, rows) {
  const t = document.getElementById(id);
  t.replaceChildren();
  const tr = el("tr");
  head.forEach(h => tr.appendChild(el("th", h)));
  t.appendChild(tr);
  rows.forEach(r => {
    const row = el("tr");
    r.forEach(c => row.appendChild(el("td", c)));
    t.appendChild(row);
  });
  if (!rows.length) {
    const row = el("tr");
    const td = el("td", "none", "none");
    td.colSpan = head.length;
    row.appendChild(td);
    t.appendChild(row);
  }
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, String(v)));
  return e;
}
function chart(history) {
  const box = document.getElementById("chart");
  box.replaceChildren();
  const W = 760, H = 200, L = 40, B = 20;
  const s = svg("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img"});
  const series = {"waiting (all)": history.map(h => h.waiting)};
  const sites = new Set();
  history.forEach(h => Object.keys(h.sites || {}).forEach(k => sites.add(k)));
  if (sites.size) {
    [...sites].sort().forEach(site => { series["running at " + site] = history.map(h => (h.sites || {})[site] || 0); });
  } else {
    series["running (all)"] = history.map(h => h.running);
  }
  const top = Math.max(1, ...Object.values(series).flat());
  const n = Math.max(2, history.length);
  s.appendChild(svg("line", {x1: L, y1: H - B, x2: W, y2: H - B, stroke: "#888"}));
  s.appendChild(svg("line", {x1: L, y1: 0, x2: L, y2: H - B, stroke: "#888"}));
  const label = svg("text", {x: 2, y: 12, "font-size": 11});
  label.textContent = String(top);
  s.appendChild(label);
  const legend = el("div", null, "legend");
  Object.entries(series).forEach(([name, values], i) => {
    const color = COLORS[i % COLORS.length];
    const points = values.map((v, j) => `${L + (W - L) * j / (n - 1)},${(H - B) - (H - B - 4) * v / top}`).join(" ");
    s.appendChild(svg("polyline", {points: points, fill: "none", stroke: color, "stroke-width": 2}));
    const item = el("span", name + ": " + (values.length ? values[values.length - 1] : 0), "key");
    item.style.borderColor = color;
    legend.appendChild(item);
  });
  box.appendChild(s);
  box.appendChild(legend);
}
function render(d) {
  const mode = d.public ? " (public: aggregated counts only)" : "";
  document.getElementById("updated").textContent = "updated " + d.time + mode;
  const jobs = Object.entries(d.jobs).filter(([, n]) => n > 0).map(([k, n]) => k + " " + n).join(", ");
  document.getElementById("totals").textContent = "jobs: " + (jobs || "none") + "; pilots alive " + d.pilots.alive +
    " (busy " + d.pilots.busy + ", idle " + d.pilots.idle + "), empty in the last hour " + d.pilots.empty;
  chart(d.history);
  table("failures", ["class", "jobs (last hour)"], Object.entries(d.failures).map(([k, n]) => [k, n]));
  document.body.classList.toggle("public", !!d.public);
  if (d.public) return;
  table("sites", ["site", "state", "pilots alive", "busy", "idle", "empty (1 h)", "jobs by state", "failures (1 h)"],
    d.sites.map(s => [s.site, s.state, s.pilots.alive, s.pilots.busy, s.pilots.idle, s.pilots.empty,
      Object.entries(s.jobs).map(([k, n]) => k + " " + n).join(", "),
      Object.entries(s.failures).map(([k, n]) => k + " " + n).join(", ")]));
  table("errors", ["job", "site", "state", "time", "message"],
    d.errors.map(e => [e.job, e.site, e.state, e.time, e.message]));
  table("unrunnable", ["class", "jobs", "oldest job", "why"],
    d.unrunnable.map(u => [u.class, u.jobs, u.oldest_job, u.why]));
}
async function poll() {
  try {
    const r = await fetch("api/monitor.json", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    document.getElementById("status").textContent = "";
  } catch (e) {
    document.getElementById("status").textContent = "the broker does not answer (" + e.message + "); retrying";
  }
}
poll();
setInterval(poll, 5000);
"""

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0; } h2 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
th { background: #f0f0f0; } td.none { color: #888; }
#errors td:last-child, #unrunnable td:last-child { white-space: pre-wrap; max-width: 60em; font-family: monospace; }
.legend .key { border-left: 12px solid; padding: 0 1em 0 4px; } #status { color: #b00; }
body.public .detail { display: none; }
"""

PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>splitpilot broker monitor</title>
<style>{style}</style></head>
<body>
<h1>splitpilot broker</h1>
<p id="updated">loading...</p><p id="status"></p>
<p id="totals"></p>
<h2>Jobs over the last hour</h2><div id="chart"></div>
<div class="detail">
<h2>Sites</h2><table id="sites"></table>
<h2>Waiting jobs no site can run</h2><table id="unrunnable"></table>
<h2>Last errors</h2><table id="errors"></table>
</div>
<h2>Failures by class (last hour)</h2><table id="failures"></table>
<script>{script}</script>
</body></html>
"""

PAGE = PAGE_TEMPLATE.format(style=STYLE, script=SCRIPT)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
CSP = (f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

__all__ = ["CSP", "PAGE"]
