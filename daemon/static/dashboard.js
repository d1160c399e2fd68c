// anomalyd operator UI, dashboard: plain SVG plots drawn here (no library, no CDN: the page works offline) from
// GET /api/stats/series. Score over time per source (mean score per bucket as a line, the highest score of each
// bucket as a dot, red above the threshold; the threshold in effect solid, the thresholds the rows were judged
// with dashed where they differ), defect rate per line per hour, inspected and anomalous frames per hour, and the
// window's totals. Uses app.js's helpers ($, apiJson, el, score, showError).
"use strict";

// window (hours) → bucket of the score plots (seconds): 70–100 points per source
const DASH_WINDOWS = { 6: 300, 24: 900, 168: 7200 };
const SCORE_BOX = { width: 640, height: 170, left: 40, right: 12, top: 14, bottom: 22 };
const RATE_BOX = { width: 640, height: 140, left: 40, right: 12, top: 14, bottom: 22 };
const dashState = { loading: false, again: false };

function dashSvg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function percent(value) { return `${(100 * value).toFixed(1)} %`; }

// A time axis over [after, before): x of a time, and tick marks at round UTC hours or days.
function timeAxis(after, before, box) {
  const start = Date.parse(after), end = Date.parse(before);
  const plotW = box.width - box.left - box.right;
  const x = (ms) => box.left + ((Math.min(end, Math.max(start, ms)) - start) / (end - start)) * plotW;
  const hours = (end - start) / 3600e3;
  const step = (hours <= 8 ? 1 : hours <= 30 ? 3 : 24) * 3600e3;
  const nodes = [];
  for (let tick = Math.ceil(start / step) * step; tick <= end; tick += step) {
    const text = new Date(tick).toISOString();
    nodes.push(dashSvg("line", { class: "grid", x1: x(tick), x2: x(tick), y1: box.top, y2: box.height - box.bottom }));
    nodes.push(dashSvg("text", { x: x(tick), y: box.height - 6, "text-anchor": "middle" },
      step >= 86400e3 ? text.slice(5, 10) : text.slice(11, 16)));
  }
  return { x, nodes };
}

function valueAxis(box, top, format) {
  const plotH = box.height - box.top - box.bottom;
  const y = (value) => box.top + plotH - (Math.min(top, Math.max(0, value)) / top) * plotH;
  const nodes = [dashSvg("line", { class: "axis", x1: box.left, x2: box.width - box.right, y1: y(0), y2: y(0) })];
  for (const fraction of [0, 0.5, 1]) {
    nodes.push(dashSvg("text", { x: box.left - 4, y: y(fraction * top) + 3, "text-anchor": "end" }, format(fraction * top)));
  }
  return { y, nodes };
}

function plotBox(box, label) {
  return dashSvg("svg", { class: "plot", viewBox: `0 0 ${box.width} ${box.height}`, role: "img", "aria-label": label });
}

// The plot drawn at the width it is shown at (text keeps its size on a phone and a wall display alike).
function sized(svg, box) {
  const width = Math.round(svg.getBoundingClientRect().width) || box.width;
  svg.setAttribute("viewBox", `0 0 ${width} ${box.height}`);
  return Object.assign({}, box, { width });
}

function scoreCard(group) {
  const svg = plotBox(SCORE_BOX, `scores of ${group.key}`);
  svg.dataset.source = group.key;
  return el("figure", { class: "plot-card" },
    el("figcaption", {}, el("b", {}, group.key),
      ` · ${group.inspections} inspected · ${group.anomalous} anomalous · model ${group.model_version || "?"}`), svg);
}

function drawScores(svg, group, data) {
  const box = sized(svg, SCORE_BOX);
  const points = group.points.filter((point) => point.max_score !== null);
  const highest = Math.max(1, group.threshold || 0, ...points.map((point) => point.max_score));
  const time = timeAxis(data.after, data.before, box);
  const value = valueAxis(box, highest, (v) => v.toFixed(2));
  const half = (data.bucket_s * 1000) / 2;
  const at = (point) => time.x(Date.parse(point.t) + half);
  const nodes = [...time.nodes, ...value.nodes];
  if (points.length > 1) {  // broken where the source was idle: no score for 6 buckets and at least 30 minutes
    const gap = Math.max(6 * 2 * half, 1800e3);
    const path = points.map((p, i) => (i > 0 && Date.parse(p.t) - Date.parse(points[i - 1].t) < gap ? "L" : "M") +
      `${at(p)} ${value.y(p.mean_score)}`);
    nodes.push(dashSvg("path", { class: "mean", d: path.join(" ") }));
  }
  // the thresholds the rows were judged with, where they differ from the one in effect (e.g. before a calibration)
  const applied = group.points.filter((point) => point.max_threshold !== null);
  if (applied.some((point) => Math.abs(point.max_threshold - group.threshold) > 1e-9)) {
    const steps = applied.map((p) => `M${time.x(Date.parse(p.t))} ${value.y(p.max_threshold)}` +
      `H${time.x(Date.parse(p.t) + 2 * half)}`);
    nodes.push(dashSvg("path", { class: "applied-threshold", d: steps.join(" ") }));
  }
  const y = value.y(group.threshold);
  nodes.push(dashSvg("line", { class: "threshold", x1: box.left, x2: box.width - box.right, y1: y, y2: y,
    "data-value": group.threshold }));
  nodes.push(dashSvg("text", { class: "threshold-label", x: box.left + 4, y: y - 3 },
    `threshold ${score(group.threshold)} ${group.calibrated ? "(calibrated)" : "(configured)"}`));
  for (const point of points) {
    const over = point.max_score >= group.threshold;
    const dot = dashSvg("circle", { class: over ? "max over" : "max", cx: at(point), cy: value.y(point.max_score), r: 2.8,
      "data-t": point.t, "data-value": point.max_score, "data-count": point.inspections });
    dot.append(dashSvg("title", {}, `${point.t.slice(0, 16).replace("T", " ")}: ${point.inspections} inspected, ` +
      `max ${score(point.max_score)}, mean ${score(point.mean_score)}`));
    nodes.push(dot);
  }
  svg.replaceChildren(...nodes);
}

function rateCard(group) {
  const svg = plotBox(RATE_BOX, `defect rate of ${group.key}`);
  svg.dataset.line = group.key;
  const sources = group.sources.length === 1 && group.sources[0] === group.key ? "" : ` (${group.sources.join(", ")})`;
  return el("figure", { class: "plot-card" },
    el("figcaption", {}, el("b", {}, group.key), `${sources} · ${group.anomalous} of ${group.inspections} anomalous` +
      ` (${percent(group.anomalous_rate)})${group.rejected ? ` · ${group.rejected} rejected frames` : ""}`), svg);
}

function drawRates(svg, group, data) {
  const box = sized(svg, RATE_BOX);
  const points = group.points.filter((point) => point.inspections > 0);
  const top = Math.max(0.1, ...points.map((point) => point.defect_rate));
  const time = timeAxis(data.after, data.before, box);
  const value = valueAxis(box, top, (v) => `${Math.round(100 * v)}%`);
  const nodes = [...time.nodes, ...value.nodes];
  for (const point of points) {
    const start = Date.parse(point.t);
    const x1 = time.x(start), x2 = time.x(start + data.bucket_s * 1000);
    const bar = dashSvg("rect", { class: "rate", x: x1 + 0.5, width: Math.max(1, x2 - x1 - 1), y: value.y(point.defect_rate),
      height: value.y(0) - value.y(point.defect_rate), "data-t": point.t, "data-value": point.defect_rate,
      "data-inspections": point.inspections, "data-anomalous": point.anomalous });
    bar.append(dashSvg("title", {}, `${point.t.slice(0, 13).replace("T", " ")}h: ${point.anomalous} of ${point.inspections} ` +
      `anomalous (${percent(point.defect_rate)})`));
    nodes.push(bar);
  }
  svg.replaceChildren(...nodes);
}

function countPlot(data) {
  // all lines together: inspected (grey) with the anomalous part (red) per hour; rejected frames as a count above
  const hours = new Map();
  for (const group of data.groups) {
    for (const point of group.points) {
      const total = hours.get(point.t) || { inspections: 0, anomalous: 0, rejected: 0 };
      total.inspections += point.inspections; total.anomalous += point.anomalous; total.rejected += point.rejected;
      hours.set(point.t, total);
    }
  }
  const svg = $("#count-plot");
  const box = sized(svg, RATE_BOX);
  const top = Math.max(1, ...[...hours.values()].map((h) => h.inspections + h.rejected));
  const time = timeAxis(data.after, data.before, box);
  const value = valueAxis(box, top, (v) => String(Math.round(v)));
  const nodes = [...time.nodes, ...value.nodes];
  for (const [t, total] of [...hours.entries()].sort()) {
    const start = Date.parse(t);
    const x1 = time.x(start) + 0.5, width = Math.max(1, time.x(start + data.bucket_s * 1000) - time.x(start) - 1);
    const bar = (kind, from, to, count) => dashSvg("rect", { class: kind, x: x1, width, y: value.y(to),
      height: value.y(from) - value.y(to), "data-t": t, "data-count": count });
    if (total.inspections) nodes.push(bar("inspected", 0, total.inspections, total.inspections));
    if (total.anomalous) nodes.push(bar("anomalous", 0, total.anomalous, total.anomalous));
    if (total.rejected) nodes.push(bar("rejected", total.inspections, total.inspections + total.rejected, total.rejected));
  }
  svg.replaceChildren(...nodes);
}

function renderDashboard(bySource, byLine) {
  const total = byLine.total;
  $("#tile-inspected").textContent = String(total.inspections);
  $("#tile-anomalous").textContent = String(total.anomalous);
  $("#tile-rate").textContent = percent(total.anomalous_rate);
  $("#tile-rejected").textContent = String(total.rejected);
  const scored = bySource.groups.filter((group) => group.points.some((point) => point.max_score !== null));
  $("#score-plots").replaceChildren(...scored.map(scoreCard));
  scored.forEach((group, index) => drawScores($("#score-plots").children[index].querySelector("svg"), group, bySource));
  if (!scored.length) $("#score-plots").append(el("p", { class: "hint" }, "No scores in this window."));
  const lines = byLine.groups.filter((group) => group.inspections > 0);
  $("#rate-plots").replaceChildren(...lines.map(rateCard));
  lines.forEach((group, index) => drawRates($("#rate-plots").children[index].querySelector("svg"), group, byLine));
  if (!lines.length) $("#rate-plots").append(el("p", { class: "hint" }, "No inspections in this window."));
  countPlot(byLine);
  const cut = bySource.truncated || byLine.truncated ? " (cut to the newest buckets: choose a shorter window)" : "";
  $("#dash-status").textContent = `${utcText(byLine.after)} – ${utcText(byLine.before)} UTC${cut}`;
}

async function loadDashboard() {
  if (dashState.loading) { dashState.again = true; return; }  // e.g. another window chosen: loaded right after
  dashState.loading = true;
  try {
    const hours = Number($("#dash-window").value) || 24;
    const before = new Date();
    const after = new Date(before.getTime() - hours * 3600e3);
    const window = `after=${encodeURIComponent(after.toISOString())}&before=${encodeURIComponent(before.toISOString())}`;
    const [bySource, byLine] = await Promise.all([
      apiJson(`/api/stats/series?by=source&bucket=${DASH_WINDOWS[hours] || 900}&${window}`),
      apiJson(`/api/stats/series?by=line&bucket=3600&${window}`)]);
    renderDashboard(bySource, byLine);
    document.body.dataset.dashboardLoaded = String(Number(document.body.dataset.dashboardLoaded || 0) + 1);
  } catch (error) {
    if (error.message !== "unauthorised") showError(`Cannot load the dashboard: ${error.message}`);
  } finally {
    dashState.loading = false;
    if (dashState.again) { dashState.again = false; loadDashboard(); }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#dash-window").addEventListener("change", loadDashboard);
  // app.js announces when the dashboard is shown and on each refresh tick while it is
  document.addEventListener("anomalyd:dashboard", loadDashboard);
});
