// anomalyd operator UI, references and score scale: the "Use as normal reference" button of the detail view and
// the histogram of the source's recent scores (unlabelled grey, labelled normal green, labelled anomalous red) with
// the image threshold (solid) and the pixel threshold (dashed) drawn on it. Uses app.js's api helpers.
"use strict";

const refState = { item: null };
const HIST = { width: 420, height: 170, left: 30, right: 10, top: 18, bottom: 24, bins: 25 };

async function useAsReference() {
  const item = refState.item;
  if (!item) return;
  $("#reference-status").textContent = "adding…";
  try {
    const body = await apiJson(`/api/sources/${encodeURIComponent(item.source)}/references`, {
      method: "POST", body: JSON.stringify({ inspection_ids: [item.id] }), headers: { "Content-Type": "application/json" },
    });
    const warnings = body.warnings && body.warnings.length ? ` Warning: ${body.warnings.join("; ")}` : "";
    $("#reference-status").textContent = `Added as ${body.added[0].name}; the bank of ${item.source} is rebuilt.${warnings}`;
  } catch (error) {
    $("#reference-status").textContent = "";
    if (error.message !== "unauthorised") showError(`Cannot add inspection ${item.id} as a reference: ${error.message}`);
  }
}

function svgNode(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawHistogram(data) {
  const svg = $("#score-histogram");
  const { width, height, left, right, top, bottom, bins } = HIST;
  const plotW = width - left - right, plotH = height - top - bottom;
  const kinds = ["unlabelled", "normal", "anomalous"];
  const counts = Array.from({ length: bins }, () => ({ unlabelled: 0, normal: 0, anomalous: 0 }));
  for (const entry of data.items) {
    const bin = Math.min(bins - 1, Math.max(0, Math.floor(entry.score * bins)));
    counts[bin][entry.label === "normal" || entry.label === "anomalous" ? entry.label : "unlabelled"] += 1;
  }
  const peak = Math.max(1, ...counts.map((c) => c.unlabelled + c.normal + c.anomalous));
  const nodes = [svgNode("line", { x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH, stroke: "#677281" })];
  counts.forEach((count, index) => {
    let y = top + plotH;
    for (const kind of kinds) {
      if (!count[kind]) continue;
      const h = (count[kind] / peak) * plotH;
      y -= h;
      nodes.push(svgNode("rect", { class: kind, x: left + (index * plotW) / bins + 0.5, y, width: plotW / bins - 1, height: h,
        "data-bin": index, "data-count": count[kind] }, undefined));
    }
  });
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    nodes.push(svgNode("text", { x: left + tick * plotW, y: height - 8, "text-anchor": "middle" }, String(tick)));
  }
  nodes.push(svgNode("text", { x: 4, y: top + 4 }, String(peak)));
  const lines = [["threshold", data.threshold, "image"], ["pixel-threshold", data.pixel_threshold, "pixel"]];
  lines.forEach(([cls, value, name], index) => {
    if (value === null || value === undefined) return;
    const x = left + Math.min(1, Math.max(0, value)) * plotW;
    nodes.push(svgNode("line", { class: cls, x1: x, x2: x, y1: top - 4, y2: top + plotH, "data-value": value }));
    nodes.push(svgNode("text", { x: x + 3, y: top + 6 + index * 11 }, `${name} ${value.toFixed(3)}`));
  });
  svg.replaceChildren(...nodes);
  const labelled = data.items.filter((entry) => entry.label).length;
  $("#histogram-caption").textContent = `${data.items.length} recent · ${labelled} labelled · thresholds ` +
    `${data.calibrated ? "calibrated for" : "configured; model"} ${data.model_version || "?"}`;
}

async function loadHistogram(source) {
  try {
    drawHistogram(await apiJson(`/api/sources/${encodeURIComponent(source)}/scores?limit=500`));
  } catch (error) {
    $("#score-histogram").replaceChildren();
    $("#histogram-caption").textContent = error.message === "unauthorised" ? "" : `(no scores: ${error.message})`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#use-reference").addEventListener("click", useAsReference);
  document.addEventListener("anomalyd:detail", (event) => {
    refState.item = event.detail;
    $("#reference-status").textContent = "";
    loadHistogram(event.detail.source);
  });
});
