# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The network map page ``netstack relay`` serves at ``/``: the pods as nodes grouped by namespace (a ring each),
the flows between them as edges - green when forwarded, red when any recent flow of the pair was dropped - updated
every two seconds from the relay's ``/api/pods`` and ``/api/flows``; a click on an edge lists its recent flows.
One static page, no external resources (the nodes and the controller may have no route out). No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

PAGE = u"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>kldload.netstack - network map</title>
<style>
 body { font-family: sans-serif; margin: 0; display: flex; height: 100vh; }
 #map { flex: 1; overflow: auto; }
 #side { width: 38em; border-left: 1px solid #ccc; padding: 0.5em; overflow: auto; font-size: 12px; }
 #side pre { white-space: pre-wrap; }
 .ns { font-weight: bold; font-size: 13px; }
 .pod circle { fill: #e8eef8; stroke: #345; }
 .pod text { font-size: 11px; }
 .edge { stroke-width: 2.5; fill: none; cursor: pointer; }
 .edge.forwarded { stroke: #1a9a3a; }
 .edge.dropped { stroke: #d0202a; }
 .edge.selected { stroke-width: 5; }
 .edge-handle { cursor: pointer; stroke: #fff; stroke-width: 1.5; }
 .edge-handle.forwarded { fill: #1a9a3a; }
 .edge-handle.dropped { fill: #d0202a; }
 #status { font-size: 12px; color: #555; padding: 0.3em; }
</style>
</head>
<body>
<div id="map"><div id="status">loading</div><svg id="svg" width="1000" height="600"></svg></div>
<div id="side"><h3>Flows</h3><p id="hint">Click an edge: its recent flows.</p><pre id="flows"></pre></div>
<script>
"use strict";
const WINDOW = "__WINDOW__";
let selected = null, lastFlows = [];
function key(ep) { return ep && ep.pod_name ? (ep.namespace + "/" + ep.pod_name) : null; }
function el(name, attrs, parent) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function line(r) {
  const f = r.flow, l4 = Object.values(f.l4 || {})[0] || {};
  return f.time.substr(11, 12) + " [" + r.node_name + "] " + (key(f.source) || f.IP.source) + ":" + (l4.source_port || "")
    + " -> " + (key(f.destination) || f.IP.destination) + ":" + (l4.destination_port || "") + " " + f.verdict
    + (f.drop_reason_desc ? " " + f.drop_reason_desc : "") + (f.policy_rule ? " (" + f.policy_rule + ")" : "")
    + (f.translation ? " " + f.translation.service + " => " + f.translation.backend : "");
}
function showEdge(id) {
  selected = id;
  const rows = lastFlows.filter(r => (key(r.flow.source) + "->" + key(r.flow.destination)) === id);
  document.getElementById("hint").textContent = id + ": " + rows.length + " recent flows";
  document.getElementById("flows").textContent = rows.slice(-50).reverse().map(line).join("\\n");
  document.querySelectorAll(".edge").forEach(e => e.classList.toggle("selected", e.getAttribute("data-edge") === id));
}
function draw(pods, flows) {
  const svg = document.getElementById("svg");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const byNs = {};
  pods.forEach(p => { (byNs[p.namespace] = byNs[p.namespace] || []).push(p); });
  const namespaces = Object.keys(byNs).sort(), pos = {};
  let maxRows = 0;
  const podsG = el("g", {id: "pods"}, svg), edgesG = el("g", {id: "edges"}, svg);   // edges on top: clickable
  let left = 170;                                 // room for the labels on the left of a ring
  namespaces.forEach(ns => {                       // each namespace a ring of its pods, side by side
    const list = byNs[ns].sort((a, b) => a.name < b.name ? -1 : 1), n = list.length;
    const r = n > 1 ? Math.max(70, n * 26) : 0, cx = left + r + 20, cy = 70 + r;
    const t = el("text", {x: cx - 30, y: 24, class: "ns", "data-namespace": ns}, podsG);
    t.textContent = ns;
    list.forEach((p, j) => {
      const a = -Math.PI / 2 + 2 * Math.PI * j / Math.max(1, n), x = cx + r * Math.cos(a), y = cy + r * Math.sin(a);
      const k = p.namespace + "/" + p.name;
      pos[k] = [x, y];
      const g = el("g", {class: "pod", "data-pod": k, "data-node": p.node || ""}, podsG);
      el("circle", {cx: x, cy: y, r: 14}, g);
      const label = el("text", {x: Math.cos(a) < -0.2 ? x - 18 : x + 18, y: y + 4,
                                "text-anchor": Math.cos(a) < -0.2 ? "end" : "start"}, g);
      label.textContent = p.name + (p.node ? " @" + p.node : "");
    });
    left = cx + r + 340;
    maxRows = Math.max(maxRows, cy + r + 40);
  });
  svg.setAttribute("width", Math.max(600, left));
  svg.setAttribute("height", Math.max(300, maxRows));
  const edges = {};
  flows.forEach(r => {
    const s = key(r.flow.source), d = key(r.flow.destination);
    if (!s || !d || s === d || !pos[s] || !pos[d]) return;
    const id = s + "->" + d;
    const e = edges[id] = edges[id] || {src: s, dst: d, n: 0, dropped: 0};
    e.n += 1;
    if (r.flow.verdict === "DROPPED") e.dropped += 1;
  });
  Object.keys(edges).sort().forEach(id => {
    const e = edges[id], a = pos[e.src], b = pos[e.dst];
    const mx = (a[0] + b[0]) / 2 + (a[1] - b[1]) * 0.15, my = (a[1] + b[1]) / 2 + (b[0] - a[0]) * 0.15;
    const p = el("path", {d: "M" + a[0] + "," + a[1] + " Q" + mx + "," + my + " " + b[0] + "," + b[1],
                          class: "edge " + (e.dropped ? "dropped" : "forwarded"), "data-edge": id,
                          "data-verdict": e.dropped ? "DROPPED" : "FORWARDED", "data-flows": e.n}, edgesG);
    el("title", {}, p).textContent = id + ": " + e.n + " flows, " + e.dropped + " dropped";
    p.addEventListener("click", () => showEdge(id));
    // a handle at the curve's middle: an easy target for a click
    const h = el("circle", {cx: 0.25 * a[0] + 0.5 * mx + 0.25 * b[0], cy: 0.25 * a[1] + 0.5 * my + 0.25 * b[1], r: 6,
                            class: "edge-handle " + (e.dropped ? "dropped" : "forwarded"), "data-edge": id}, edgesG);
    el("title", {}, h).textContent = id + ": " + e.n + " flows, " + e.dropped + " dropped";
    h.addEventListener("click", () => showEdge(id));
  });
  if (selected) showEdge(selected);
}
async function refresh() {
  try {
    const [pods, text] = await Promise.all([
      fetch("api/pods").then(r => r.json()),
      fetch("api/flows?since=" + WINDOW).then(r => r.text())]);
    lastFlows = text.split("\\n").filter(x => x).map(x => JSON.parse(x)).filter(r => r.flow);
    draw(pods, lastFlows);
    document.getElementById("status").textContent = pods.length + " pods, " + lastFlows.length
      + " flows in the last " + WINDOW + ", updated " + new Date().toLocaleTimeString();
    document.body.setAttribute("data-updated", String(Date.now()));
  } catch (err) {
    document.getElementById("status").textContent = "relay unreachable: " + err;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"""


def page(window="5m"):
    """The page; ``window``: how far back its flows go (a --since duration)."""
    return PAGE.replace("__WINDOW__", window)
