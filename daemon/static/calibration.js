// anomalyd operator UI, the references and calibration page of one source (GET /api/sources/{id}/calibration):
// the threshold in effect with its origin (who or what set it, when, pinned or not) and its newest changes; the
// false-reject rate against the miss rate of the labelled frames, where a click on a point chooses its threshold
// for the pin form; the score histogram of recent frames (labelled normal green, labelled anomalous red,
// unlabelled grey); the reference thumbnails with their leave-one-out scores (remove) and the newest frames (add).
// Pins, references and their removal go through the existing endpoints, so each change is recorded as before
// (threshold_history for pins). Uses app.js's helpers; the page's markup is built here.
"use strict";

const calState = { source: null, data: null, chosen: null, urls: [], loading: 0 };
const CURVE = { width: 360, height: 280, left: 42, right: 12, top: 12, bottom: 36 };
const CAL_HIST = { width: 420, height: 170, left: 30, right: 10, top: 18, bottom: 24 };

function calSvg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function utcWhen(iso) { return `${utcText(iso).replace(/[+-]00:00$/, "")} UTC`; }
function percent(value) { return value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)} %`; }
function calPath(suffix = "") { return `/api/sources/${encodeURIComponent(calState.source)}${suffix}`; }

function buildCalibrationPage() {
  const view = $("#view-calibration");
  view.replaceChildren(
    el("div", { class: "toolbar" },
      el("label", {}, "Source ", el("select", { id: "cal-source", "aria-label": "source" })), " ",
      el("button", { type: "button", id: "cal-refresh" }, "Refresh"), " ",
      el("span", { id: "cal-status", class: "hint" })),
    el("div", { class: "cal-grid" },
      el("section", { class: "cal-card", id: "cal-threshold-card" },
        el("h3", {}, "Threshold in effect"),
        el("p", { class: "cal-value" }, el("strong", { id: "cal-threshold" }, "–"), " ",
          el("span", { id: "cal-origin", class: "pill" }, "")),
        el("p", { id: "cal-origin-detail", class: "hint" }),
        el("p", { id: "cal-cost" }),
        el("form", { id: "cal-pin-form", class: "cal-pin" },
          el("input", { id: "cal-pin-value", type: "number", min: "0", max: "1", step: "any", required: "",
            "aria-label": "threshold to pin", placeholder: "0.000" }),
          el("button", { type: "submit", id: "cal-pin" }, "Pin"),
          el("button", { type: "button", id: "cal-unpin" }, "Unpin"),
          el("span", { id: "cal-pin-status", class: "hint" })),
        el("p", { id: "cal-chosen", class: "hint" }, "Click a point of the curve to choose its threshold, or type one."),
        el("h4", {}, "Newest changes"),
        el("ol", { id: "cal-history", class: "hint" })),
      el("section", { class: "cal-card" },
        el("h3", {}, "False rejects against misses ", el("span", { class: "hint" }, "labelled frames; each point is a threshold")),
        calSvg("svg", { id: "cal-curve", class: "cal-plot", viewBox: `0 0 ${CURVE.width} ${CURVE.height}`, role: "img",
          "aria-label": "false-reject rate against miss rate" }),
        el("p", { id: "cal-curve-caption", class: "hint" })),
      el("section", { class: "cal-card" },
        el("h3", {}, "Scores of recent frames ", el("span", { id: "cal-hist-caption", class: "hint" })),
        calSvg("svg", { id: "cal-histogram", class: "histogram", viewBox: `0 0 ${CAL_HIST.width} ${CAL_HIST.height}`,
          role: "img", "aria-label": "score histogram of recent frames" }),
        el("p", { class: "hint cal-legend" }, el("span", { class: "swatch normal" }), " labelled normal ",
          el("span", { class: "swatch anomalous" }), " labelled anomalous ", el("span", { class: "swatch unlabelled" }),
          " unlabelled · solid line: threshold in effect · dashed: the chosen point"))),
    el("section", { class: "cal-card cal-wide", id: "cal-proposal", hidden: "" },  // proposal.js
      el("h3", {}, "Proposed references ", el("span", { id: "cal-proposal-caption", class: "hint" })),
      el("p", { id: "cal-drift", class: "cal-drift" }),
      el("div", { id: "cal-proposed", class: "thumbs" }),
      el("p", {}, el("button", { type: "button", id: "cal-approve", hidden: "" }, "Approve"), " ",
        el("span", { id: "cal-proposal-status", class: "hint" }))),
    el("section", { class: "cal-card cal-wide" },
      el("h3", {}, "References ", el("span", { id: "cal-ref-caption", class: "hint" })),
      el("div", { id: "cal-references", class: "thumbs" }),
      el("p", { id: "cal-ref-status", class: "hint" }),
      el("h3", {}, "Newest frames ", el("span", { class: "hint" }, "add a good one as a reference")),
      el("div", { id: "cal-recent", class: "thumbs" })));
  $("#cal-curve").addEventListener("click", curveClick);
  $("#cal-source").addEventListener("change", () => { calState.source = $("#cal-source").value; loadCalibration(); });
  $("#cal-refresh").addEventListener("click", () => loadCalibration());
  $("#cal-pin-form").addEventListener("submit", (event) => { event.preventDefault(); changeCalPin("PUT"); });
  $("#cal-unpin").addEventListener("click", () => changeCalPin("DELETE"));
}

async function fillSources() {
  const data = await apiJson("/api/sources");
  const ids = data.items.map((item) => item.id);
  if (!calState.source || !ids.includes(calState.source)) calState.source = ids[0] || null;
  $("#cal-source").replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
  if (calState.source) $("#cal-source").value = calState.source;
}

async function openCalibration(source) {
  if (source) calState.source = source;
  try {
    await fillSources();
  } catch (error) {
    if (error.message !== "unauthorised") showError(`Cannot list the sources: ${error.message}`);
    return;
  }
  if (!calState.source) { $("#cal-status").textContent = "No sources configured."; return; }
  await loadCalibration();
}

async function loadCalibration() {
  const ticket = ++calState.loading;  // a source picked while loading: only the newest answer is drawn
  $("#cal-status").textContent = "loading…";
  try {
    const data = await apiJson(calPath("/calibration"));
    if (ticket !== calState.loading) return;
    calState.data = data;
    calState.chosen = null;
    renderThreshold(data);
    drawCurve(data);
    drawCalHistogram(data);
    await renderReferences(data);
    if (ticket !== calState.loading) return;
    await renderProposal(data, ticket);
    if (ticket !== calState.loading) return;
    $("#cal-status").textContent = `model version ${data.model_version || "?"}`;
  } catch (error) {
    if (ticket !== calState.loading) return;
    $("#cal-status").textContent = "";
    if (error.message !== "unauthorised") showError(`Cannot load the calibration of ${calState.source}: ${error.message}`);
  }
}

function renderThreshold(data) {
  const shown = data.threshold;
  $("#cal-threshold").textContent = shown.threshold.toFixed(4);
  $("#cal-threshold").dataset.value = String(shown.threshold);
  const origin = $("#cal-origin");
  origin.textContent = shown.pinned ? "pinned" : shown.origin;
  origin.dataset.origin = shown.origin;
  const row = shown.set_by_row;
  let detail = shown.origin === "configured" ? "from the configuration ([[sources]].threshold); no calibration stored for this model version" : "";
  if (row) detail = `${row.action} by ${row.set_by} at ${utcWhen(row.created_at)}: ${row.rule}`;
  detail += ` · pixel threshold ${shown.pixel_threshold.toFixed(4)}`;
  $("#cal-origin-detail").textContent = detail;
  const at = data.at_threshold;
  const normals = data.labelled.normal.length, defects = data.labelled.anomalous.length;
  $("#cal-cost").textContent = `At this threshold: ${at.false_rejects} of ${normals} labelled normals rejected (${percent(at.false_reject_rate)}), ` +
    `${at.misses} of ${defects} labelled defects missed (${percent(at.miss_rate)}).`;
  $("#cal-unpin").disabled = !shown.pinned;
  $("#cal-history").replaceChildren(...shown.history.map((change) => el("li", { "data-action": change.action },
    `${utcWhen(change.created_at)} ${change.action} ${change.threshold.toFixed(4)} by ${change.set_by}: ${change.rule}`)));
  if (!shown.history.length) $("#cal-history").append(el("li", {}, "no changes recorded yet"));
}

// Square-root axes: the low rates an operator chooses between get most of the room.
function curveXY(missRate, falseRejectRate) {
  const { width, height, left, right, top, bottom } = CURVE;
  return [left + Math.sqrt(missRate) * (width - left - right), top + (1 - Math.sqrt(falseRejectRate)) * (height - top - bottom)];
}

function drawCurve(data) {
  const svg = $("#cal-curve");
  const { width, height, left, right, top, bottom } = CURVE;
  const nodes = [];
  for (const tick of [0, 0.01, 0.05, 0.1, 0.25, 0.5, 1]) {
    const [x] = curveXY(tick, 0), [, y] = curveXY(0, tick);
    nodes.push(calSvg("line", { class: "grid", x1: x, x2: x, y1: top, y2: height - bottom }));
    nodes.push(calSvg("line", { class: "grid", x1: left, x2: width - right, y1: y, y2: y }));
    nodes.push(calSvg("text", { x, y: height - bottom + 12, "text-anchor": "middle" }, `${Math.round(100 * tick)}`));
    nodes.push(calSvg("text", { x: left - 4, y: y + 3, "text-anchor": "end" }, `${Math.round(100 * tick)}`));
  }
  nodes.push(calSvg("text", { x: left + (width - left - right) / 2, y: height - 4, "text-anchor": "middle" }, "missed defects (%, square-root axis)"));
  nodes.push(calSvg("text", { x: 10, y: top + (height - top - bottom) / 2, "text-anchor": "middle",
    transform: `rotate(-90 10 ${top + (height - top - bottom) / 2})` }, "rejected normals (%, square-root axis)"));
  const points = data.curve;
  if (points.length) {
    nodes.push(calSvg("polyline", { class: "curve", points: points.map((p) => curveXY(p.miss_rate, p.false_reject_rate).join(",")).join(" ") }));
  }
  points.forEach((p, index) => {
    const [x, y] = curveXY(p.miss_rate, p.false_reject_rate);
    const dot = calSvg("circle", { class: "curve-point", cx: x, cy: y, r: points.length > 40 ? 3.5 : 5, tabindex: "0", "data-index": index,
      "data-threshold": p.threshold });
    dot.append(calSvg("title", {}, `threshold ${p.threshold.toFixed(4)}: ${p.false_rejects} normals rejected, ${p.misses} defects missed`));
    dot.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") choosePoint(index); });
    nodes.push(dot);
  });
  const at = data.at_threshold;
  if (at.miss_rate !== null && at.false_reject_rate !== null) {
    const [x, y] = curveXY(at.miss_rate, at.false_reject_rate);
    nodes.push(calSvg("rect", { class: "in-effect", x: x - 6, y: y - 6, width: 12, height: 12, "data-threshold": at.threshold }));
    nodes.push(calSvg("text", { x: x + 9, y: y - 7 }, `in effect ${at.threshold.toFixed(3)}`));
  }
  svg.replaceChildren(...nodes);
  const normals = data.labelled.normal.length, defects = data.labelled.anomalous.length;
  const versions = Object.keys(data.labelled.model_versions);
  let caption = `${normals} labelled normals, ${defects} labelled defects (newest ${data.labelled.limit} labels), scores as they were given`;
  if (versions.length > 1) caption += `; ${versions.length} model versions scored them, and a new version (a rebuilt bank) can change the scale`;
  if (!points.length) caption = `No curve yet: it needs labelled normals and labelled defects of this source (now ${normals} and ${defects}). Label frames in History.`;
  $("#cal-curve-caption").textContent = caption;
}

// A click chooses the nearest point within 12 px (points of a long curve lie closer than a fingertip).
function curveClick(event) {
  const svg = $("#cal-curve");
  const matrix = svg.getScreenCTM();
  if (!matrix || !calState.data || !calState.data.curve.length) return;
  const at = new DOMPoint(event.clientX, event.clientY).matrixTransform(matrix.inverse());
  let best = -1, bestDistance = 12;
  calState.data.curve.forEach((p, index) => {
    const [x, y] = curveXY(p.miss_rate, p.false_reject_rate);
    const distance = Math.hypot(x - at.x, y - at.y);
    if (distance <= bestDistance) { best = index; bestDistance = distance; }
  });
  if (best >= 0) choosePoint(best);
}

function choosePoint(index) {
  const p = calState.data.curve[index];
  calState.chosen = p.threshold;
  for (const dot of document.querySelectorAll("#cal-curve circle.curve-point")) dot.classList.toggle("selected", dot.dataset.index === String(index));
  $("#cal-pin-value").value = p.threshold.toFixed(4);
  $("#cal-chosen").textContent = `Chosen: threshold ${p.threshold.toFixed(4)}: ${p.false_rejects} of ${calState.data.labelled.normal.length} ` +
    `labelled normals rejected (${percent(p.false_reject_rate)}), ${p.misses} of ${calState.data.labelled.anomalous.length} labelled defects ` +
    `missed (${percent(p.miss_rate)}). Pin it to use it from the next frame on.`;
  drawCalHistogram(calState.data);
}

async function changeCalPin(method) {
  const status = $("#cal-pin-status");
  const options = { method };
  if (method === "PUT") {
    const typed = Number($("#cal-pin-value").value);
    // the chosen point's exact threshold when the box still shows it (its 4 digits could cross a labelled score)
    const value = calState.chosen !== null && typed.toFixed(4) === calState.chosen.toFixed(4) ? calState.chosen : typed;
    options.body = JSON.stringify({ threshold: value, pixel_threshold: calState.data ? calState.data.threshold.pixel_threshold : null });
    options.headers = { "Content-Type": "application/json" };
  }
  status.textContent = "saving…";
  try {
    await api(calPath("/thresholds/pin"), options);
    status.textContent = method === "PUT" ? "pinned" : "unpinned";
  } catch (error) {
    status.textContent = "";
    if (error.message !== "unauthorised") showError(`Cannot ${method === "PUT" ? "pin" : "unpin"} the threshold of ${calState.source}: ${error.message}`);
  }
  await loadCalibration();
}

function drawCalHistogram(data) {
  const hist = data.histogram;
  const { width, height, left, right, top, bottom } = CAL_HIST;
  const plotW = width - left - right, plotH = height - top - bottom;
  const kinds = ["unlabelled", "normal", "anomalous"];
  const peak = Math.max(1, ...hist.normal.map((_, i) => hist.normal[i] + hist.anomalous[i] + hist.unlabelled[i]));
  const nodes = [calSvg("line", { x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH, stroke: "#677281" })];
  for (let index = 0; index < hist.bins; index += 1) {
    let y = top + plotH;
    for (const kind of kinds) {
      const count = hist[kind][index];
      if (!count) continue;
      const h = (count / peak) * plotH;
      y -= h;
      const bar = calSvg("rect", { class: kind, x: left + (index * plotW) / hist.bins + 0.5, y, width: plotW / hist.bins - 1,
        height: h, "data-bin": index, "data-count": count });
      bar.append(calSvg("title", {}, `${count} ${kind}, scores ${hist.edges[index]}–${hist.edges[index + 1]}`));
      nodes.push(bar);
    }
  }
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) nodes.push(calSvg("text", { x: left + tick * plotW, y: height - 8, "text-anchor": "middle" }, String(tick)));
  nodes.push(calSvg("text", { x: 4, y: top + 4 }, String(peak)));
  const value = data.threshold.threshold;
  const x = left + Math.min(1, Math.max(0, value)) * plotW;
  nodes.push(calSvg("line", { class: "threshold", x1: x, x2: x, y1: top - 4, y2: top + plotH, "data-value": value }));
  nodes.push(calSvg("text", { x: x + 3, y: top + 6 }, `threshold ${value.toFixed(3)}`));
  if (calState.chosen !== null) {
    const cx = left + Math.min(1, Math.max(0, calState.chosen)) * plotW;
    nodes.push(calSvg("line", { class: "chosen", x1: cx, x2: cx, y1: top - 4, y2: top + plotH, "data-value": calState.chosen }));
  }
  $("#cal-histogram").replaceChildren(...nodes);
  $("#cal-hist-caption").textContent = `${hist.frames} newest scored frames (at most ${hist.limit})`;
}

async function imageUrl(path) {
  const url = URL.createObjectURL(await (await api(path)).blob());
  calState.urls.push(url);
  return url;
}

function thumb(url, alt) {
  const image = el("img", { alt, loading: "lazy" });
  imageUrl(url).then((src) => { image.src = src; }).catch(() => { image.alt = `${alt} (not readable)`; });
  return image;
}

async function renderReferences(data) {
  for (const url of calState.urls.splice(0)) URL.revokeObjectURL(url);
  const refs = data.references;
  const bank = refs.bank;
  $("#cal-ref-caption").textContent = `${refs.items.length} files` + (bank ? ` · bank ${bank.version || "not built"}${bank.error ? `: ${bank.error}` : ""}${bank.warning ? ` · ${bank.warning}` : ""}` : "") +
    ` · leave-one-out: the file's score against a bank of the others (PatchCore, the first ${refs.held_out_at_most} files)`;
  $("#cal-references").replaceChildren(...refs.items.map((item) => {
    const loo = item.leave_one_out_score;
    const card = el("figure", { class: "thumb", "data-name": item.name }, thumb(item.thumbnail_url, item.name),
      el("figcaption", {}, el("span", { class: "thumb-name", title: item.name }, item.name),
        el("span", { class: "hint" }, loo === null || loo === undefined ? "leave-one-out –" : `leave-one-out ${loo.toFixed(3)}`)));
    if (item.removable) card.append(el("button", { type: "button", class: "remove-ref", onclick: () => removeReference(item.name) }, "Remove"));
    return card;
  }));
  if (!refs.items.length) $("#cal-references").append(el("p", { class: "hint" }, "No references: add known-good frames below."));
  $("#cal-recent").replaceChildren(...data.recent_frames.map((frame) => el("figure", { class: "thumb", "data-id": frame.id },
    thumb(frame.frame_url, `inspection ${frame.id}`),
    el("figcaption", {}, el("span", {}, `#${frame.id} · ${score(frame.score)}`), " ",
      frame.label ? el("span", { class: `pill ${frame.label}` }, frame.label) : el("span", { class: "hint" }, "unlabelled")),
    el("button", { type: "button", class: "add-ref", onclick: () => addReference(frame.id) }, "Add as reference"))));
  if (!data.recent_frames.length) $("#cal-recent").append(el("p", { class: "hint" }, "No stored frames ([storage].save_frames)."));
}

async function addReference(id) {
  $("#cal-ref-status").textContent = "adding…";
  try {
    const body = await apiJson(calPath("/references"), { method: "POST", body: JSON.stringify({ inspection_ids: [id] }),
      headers: { "Content-Type": "application/json" } });
    const warnings = body.warnings.length ? ` Warning: ${body.warnings.join("; ")}` : "";
    $("#cal-ref-status").textContent = `Added inspection ${id} as ${body.added[0].name}; the bank is rebuilt.${warnings}`;
  } catch (error) {
    $("#cal-ref-status").textContent = "";
    if (error.message !== "unauthorised") showError(`Cannot add inspection ${id} as a reference: ${error.message}`);
  }
  await loadCalibration();
}

async function removeReference(name) {
  if (!confirm(`Remove reference ${name} of ${calState.source}? Its bank is rebuilt without it.`)) return;
  try {
    await api(calPath(`/references?name=${encodeURIComponent(name)}`), { method: "DELETE" });
    $("#cal-ref-status").textContent = `Removed ${name}; the bank is rebuilt.`;
  } catch (error) {
    if (error.message !== "unauthorised") showError(`Cannot remove reference ${name}: ${error.message}`);
  }
  await loadCalibration();
}

document.addEventListener("DOMContentLoaded", () => {
  buildCalibrationPage();
  const tab = document.querySelector('.tab[data-view="calibration"]');
  tab.addEventListener("click", () => openCalibration());
  // the detail view's source: a link to its page, and the page opens on it
  const link = el("button", { type: "button", id: "open-calibration" }, "References & calibration →");
  link.addEventListener("click", () => { switchView("calibration"); openCalibration(calState.detailSource); });
  $("#threshold-box").append(link);
  document.addEventListener("anomalyd:detail", (event) => {
    calState.detailSource = event.detail.source;
    if (!calState.data) calState.source = event.detail.source;
  });
});
