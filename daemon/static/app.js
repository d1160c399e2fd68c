// anomalyd operator UI: plain JavaScript over the token-protected JSON API (no build step).
// The token is entered once, kept in localStorage and sent as "Authorization: Bearer". Images are fetched
// with the token too (an <img src> cannot send it) and shown from blob: URLs. Times are shown and entered in UTC.
"use strict";

const TOKEN_KEY = "anomalyd.token";
const $ = (selector) => document.querySelector(selector);
const state = { cursors: [null], page: 0, nextCursor: null, selected: null, blobs: [], liveAbort: null, liveCount: 0 };

function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {}, { Authorization: `Bearer ${token()}` });
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    showLogin("The token was not accepted; enter a valid one.");
    throw new Error("unauthorised");
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { const body = await response.json(); if (body.detail) detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (_) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

async function apiJson(path, options) { return (await api(path, options)).json(); }

async function blobUrl(path) {
  const response = await api(path);
  const url = URL.createObjectURL(await response.blob());
  state.blobs.push(url);
  return url;
}

function utcText(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("Z", "") : ""; }
function score(value) { return value === null || value === undefined ? "–" : value.toFixed(3); }
// A frame's verdict: anomalous, normal, or no decision (a mutual window still filling, or a drift holding alerts).
function verdictText(item) {
  if (item.verdict === "no_decision" || item.is_anomalous === null) return "no decision";
  return item.is_anomalous ? "anomalous" : "normal";
}

function verdictClass(item) {
  if (item.verdict === "no_decision" || item.is_anomalous === null) return "anomalous-undecided";
  return item.is_anomalous ? "anomalous-yes" : "anomalous-no";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}
function labelPill(label) {
  return label ? el("span", { class: `pill ${label.label}` }, label.label) : el("span", { class: "hint" }, "–");
}

// --- login ---------------------------------------------------------------------------------------------------

function showLogin(message) {
  $("#login").hidden = false;
  $("main").hidden = true;
  $("#signout").hidden = true;
  showError(message || "");
  $("#token").focus();
}

function signedIn() {
  $("#login").hidden = true;
  $("main").hidden = false;
  $("#signout").hidden = false;
  showError("");
  loadStats();
  loadHistory(true);
  startLive();
  startRefresh();
}

// --- refresh: the header stats (and the dashboard while it is shown) periodically and soon after a live alert

// localStorage "anomalyd.refreshMs" changes the period (a wall display may want it faster); at least 1 s
function refreshMs() { return Math.max(1000, Number(localStorage.getItem("anomalyd.refreshMs")) || 15000); }

function refreshNow() {
  if ($("main").hidden || document.hidden) return;
  state.lastRefresh = Date.now();
  loadStats();
  if (!$("#view-dashboard").hidden) document.dispatchEvent(new CustomEvent("anomalyd:dashboard"));
}

function startRefresh() {
  clearInterval(state.refreshTimer);
  state.refreshTimer = setInterval(refreshNow, refreshMs());
}

function refreshSoon() {  // after an alert; a stream of alerts refreshes at most every 5 s (the queries aggregate a day)
  if (state.refreshSoonTimer) return;
  const wait = Math.max(500, (state.lastRefresh || 0) + 5000 - Date.now());
  state.refreshSoonTimer = setTimeout(() => { state.refreshSoonTimer = null; refreshNow(); }, wait);
}

// --- history -------------------------------------------------------------------------------------------------

function filterParams() {
  const form = new FormData($("#filters"));
  const params = new URLSearchParams();
  for (const [key, raw] of form.entries()) {
    const value = String(raw).trim();
    if (!value) continue;
    params.set(key, key === "after" || key === "before" ? `${value.length === 16 ? value + ":00" : value}Z` : value);
  }
  return params;
}

async function loadHistory(reset) {
  if (reset) { state.cursors = [null]; state.page = 0; }
  const params = filterParams();
  const cursor = state.cursors[state.page];
  if (cursor) params.set("cursor", cursor);
  try {
    const data = await apiJson(`/api/inspections?${params}`);
    renderHistory(data.items);
    state.nextCursor = data.next_cursor;
    $("#next-page").disabled = !data.next_cursor;
    $("#prev-page").disabled = state.page === 0;
    $("#first-page").disabled = state.page === 0;
    $("#page-info").textContent = `page ${state.page + 1} · ${data.items.length} rows`;
    showError("");
  } catch (error) { if (error.message !== "unauthorised") showError(`Cannot load the history: ${error.message}`); }
}

function renderHistory(items) {
  const body = $("#history tbody");
  body.replaceChildren(...items.map((item) => {
    const row = el("tr", { "data-id": item.id, onclick: () => openDetail(item.id) },
      el("td", {}, String(item.id)), el("td", {}, utcText(item.captured_at)), el("td", {}, item.source),
      el("td", { class: "file-cell", title: item.frame_name || item.frame_id }, fileName(item.frame_name || item.frame_id)),
      el("td", { class: "low" }, item.line), el("td", {}, score(item.score)),
      el("td", { class: verdictClass(item) }, verdictText(item)),
      el("td", { class: "label-cell" }, labelPill(item.label)));
    if (state.selected === item.id) row.classList.add("selected");
    return row;
  }));
  if (!items.length) body.append(el("tr", {}, el("td", { colspan: "8", class: "hint" }, "No inspections match these filters.")));
}

// The file name of a stored frame path (folder sources keep where the file went after processing).
function fileName(path) { return String(path || "").split(/[\\/]/).pop(); }

// --- detail --------------------------------------------------------------------------------------------------

async function openDetail(id) {
  state.selected = id;
  for (const row of document.querySelectorAll("#history tbody tr")) row.classList.toggle("selected", row.dataset.id === String(id));
  for (const url of state.blobs.splice(0)) URL.revokeObjectURL(url);
  let item;
  try { item = await apiJson(`/api/inspections/${id}`); } catch (error) { showError(`Cannot open inspection ${id}: ${error.message}`); return; }
  $("#detail").hidden = false;
  $("#detail-title").textContent = `Inspection #${item.id} · ${item.source} / ${item.line}`;
  const facts = [["captured", utcText(item.captured_at) + " UTC"], ["score", `${score(item.score)} (threshold ${score(item.threshold)})`],
    ["result", verdictText(item)], ["model", item.model_version], ["frame", item.frame_name || item.frame_id],
    ["regions", String(item.regions.length)]];
  if (item.error) facts.push(["error", item.error]);
  $("#detail-facts").replaceChildren(...facts.flatMap(([key, value]) => [el("dt", {}, key), el("dd", {}, value)]));
  renderLabels(item);
  document.dispatchEvent(new CustomEvent("anomalyd:detail", { detail: item }));  // references.js
  $("#label-status").textContent = "";
  $("#mask-file").value = "";

  const frame = $("#frame-img"), heat = $("#heatmap-img");
  frame.removeAttribute("src"); heat.removeAttribute("src");
  const base = item.frame_url || item.heatmap_url;
  if (base) frame.src = await blobUrl(base).catch(() => "");
  if (item.heatmap_url && item.frame_url) heat.src = await blobUrl(item.heatmap_url).catch(() => "");
  heat.hidden = !(item.heatmap_url && item.frame_url);
  drawRegions(item);
  await drawMask(item.label && item.label.mask_url ? item.label.mask_url : item.mask_url);
  applyOpacity();
}

function renderLabels(item) {
  const list = $("#label-history");
  list.replaceChildren(...(item.labels || []).map((label) =>
    el("li", {}, labelPill(label), ` by ${label.author || "?"} at ${utcText(label.created_at)}${label.mask_url ? " (with mask)" : ""}`)));
  if (!list.children.length) list.append(el("li", { class: "hint" }, "not labelled yet"));
}

function drawRegions(item) {
  const svg = $("#regions");
  const width = item.width || 1, height = item.height || 1;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren(...item.regions.map((region) => {
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    for (const key of ["x", "y"]) rect.setAttribute(key, region[key]);
    rect.setAttribute("width", region.w); rect.setAttribute("height", region.h);
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `area ${region.area}, peak ${score(region.peak)}`;
    rect.append(title);
    return rect;
  }));
}

async function drawMask(url) {
  // The mask PNG is white-on-black; paint its defect pixels red with full alpha, the rest transparent.
  const canvas = $("#mask-canvas");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (!url) return;
  try {
    const image = new Image();
    image.src = await blobUrl(url);
    await image.decode();
    canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
    context.drawImage(image, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
    const data = pixels.data;
    for (let i = 0; i < data.length; i += 4) {
      const on = data[i] > 127 || data[i + 1] > 127 || data[i + 2] > 127;
      data[i] = 255; data[i + 1] = 32; data[i + 2] = 32; data[i + 3] = on ? 255 : 0;
    }
    context.putImageData(pixels, 0, 0);
  } catch (_) { /* no mask file: nothing to overlay */ }
}

function applyOpacity() {
  $("#heatmap-img").style.opacity = $("#heatmap-opacity").value;
  $("#mask-canvas").style.opacity = $("#mask-opacity").value;
  $("#regions").style.display = $("#show-regions").checked ? "" : "none";
}

async function postLabel(label) {
  const id = state.selected;
  if (!id) return;
  const file = $("#mask-file").files[0];
  let options;
  if (file) {
    const body = new FormData();
    body.set("label", label);
    body.set("mask", file, file.name);
    options = { method: "POST", body };
  } else {
    options = { method: "POST", body: JSON.stringify({ label }), headers: { "Content-Type": "application/json" } };
  }
  $("#label-status").textContent = "saving…";
  try {
    const saved = await apiJson(`/api/inspections/${id}/label`, options);
    const row = document.querySelector(`#history tbody tr[data-id="${id}"] .label-cell`);
    if (row) row.replaceChildren(labelPill(saved));
    renderLabels(await apiJson(`/api/inspections/${id}`));
    if (saved.mask_url) await drawMask(saved.mask_url);
    applyOpacity();
    await loadStats();
    $("#mask-file").value = "";
    $("#label-status").textContent = `Saved: ${saved.label}${saved.mask_url ? " with mask" : ""}.`;
  } catch (error) {
    $("#label-status").textContent = "";
    if (error.message !== "unauthorised") showError(`Cannot label inspection ${id}: ${error.message}`);
  }
}

// --- stats, live feed, models ---------------------------------------------------------------------------------

async function loadStats() {
  // a slow database: no pile-up of the same query; a call meanwhile (a new label) loads once more after it
  if (state.statsLoading) { state.statsAgain = true; return; }
  state.statsLoading = true;
  try {
    const stats = await apiJson("/api/stats");
    const total = stats.total;
    $("#stats").textContent = `last 24 h: ${total.inspections} inspected · ${total.anomalous} anomalous ` +
      `(${(100 * total.anomalous_rate).toFixed(1)} %) · ${total.rejected} rejected · labels ${stats.labels.normal} normal / ${stats.labels.anomalous} anomalous`;
    $("#stats").title = `counts of ${utcText(stats.after)} – ${utcText(stats.before)} UTC`;
    $("#sources-list").replaceChildren(...stats.sources.map((source) => el("option", { value: source.source })));
  } catch (_) { /* shown by the history call */ } finally {
    state.statsLoading = false;
    if (state.statsAgain) { state.statsAgain = false; loadStats(); }
  }
}

async function startLive() {
  if (state.liveAbort) state.liveAbort.abort();
  const controller = new AbortController();
  state.liveAbort = controller;
  let lastId = null;
  while (!controller.signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${token()}`, Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await fetch("/api/events", { headers, signal: controller.signal });
      if (response.status === 401) { showLogin("The token was not accepted; enter a valid one."); return; }
      if (!response.ok || !response.body) throw new Error(`${response.status}`);
      $("#live-state").textContent = "connected";
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const fields = {};
          for (const line of block.split("\n")) {
            const colon = line.indexOf(":");
            if (colon > 0) fields[line.slice(0, colon)] = (fields[line.slice(0, colon)] || "") + line.slice(colon + 1).replace(/^ /, "");
          }
          if (fields.id) lastId = fields.id;
          if (fields.data && fields.event === "alert") addLiveAlert(JSON.parse(fields.data));
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      $("#live-state").textContent = "reconnecting…";
    }
    await new Promise((resolve) => setTimeout(resolve, 3000));
  }
}

function addLiveAlert(item) {
  const row = el("tr", { class: "fresh", "data-id": item.id, onclick: () => { switchView("history"); openDetail(item.id); } },
    el("td", {}, String(item.id)), el("td", {}, utcText(item.captured_at)), el("td", {}, item.source), el("td", {}, item.line),
    el("td", { class: "anomalous-yes" }, score(item.score)), el("td", {}, score(item.threshold)), el("td", {}, String(item.regions.length)));
  const body = $("#live tbody");
  body.prepend(row);
  while (body.children.length > 200) body.lastChild.remove();
  refreshSoon();
  if ($("#view-live").hidden) {
    state.liveCount += 1;
    $("#live-count").textContent = String(state.liveCount);
    $("#live-count").hidden = false;
  }
}

function metricsText(metrics) {
  if (!metrics) return "–";
  return Object.entries(metrics).filter(([, value]) => typeof value !== "object")
    .map(([key, value]) => `${key} ${typeof value !== "number" ? value
      : /threshold|score/.test(key) ? value.toFixed(3) : Number(value.toPrecision(4))}`).join(" · ");
}

async function loadModels() {
  try {
    const data = await apiJson("/api/models");
    $("#models tbody").replaceChildren(...data.items.map((model) => el("tr", {},
      el("td", {}, model.version), el("td", { class: "low" }, model.kind), el("td", {}, model.status),
      el("td", { class: "wrap" }, metricsText(model.metrics)),
      el("td", {}, utcText(model.created_at)), el("td", { class: "low" }, utcText(model.activated_at)),
      el("td", {}, model.status === "active" ? "" : el("button", { type: "button", onclick: () => activate(model.version) }, "Activate")))));
    if (!data.items.length) $("#models tbody").append(el("tr", {}, el("td", { colspan: "7", class: "hint" }, "No model versions recorded yet.")));
    // a failed run registers no version: its reason is only in the runs
    $("#model-runs tbody").replaceChildren(...(data.runs || []).map((run) => el("tr", { class: `run-${run.status}` },
      el("td", {}, `#${run.id}`), el("td", {}, run.status), el("td", {}, utcText(run.started_at)),
      el("td", {}, run.candidate_version || "–"),
      el("td", { class: "wrap" }, `${run.promoted ? "promoted · " : ""}${run.reason || ""}`))));
  } catch (error) { if (error.message !== "unauthorised") showError(`Cannot load the models: ${error.message}`); }
}

async function activate(version) {
  if (!confirm(`Activate model version ${version}?`)) return;
  try {
    await api(`/api/models/${encodeURIComponent(version)}/activate`, { method: "POST" });
    $("#models-status").textContent = `${version} activated.`;
    loadModels();
  } catch (error) { if (error.message !== "unauthorised") showError(`Cannot activate ${version}: ${error.message}`); }
}

async function retrain() {
  try {
    await api("/api/retrain", { method: "POST" });
    $("#models-status").textContent = "Retraining requested.";
  } catch (error) { if (error.message !== "unauthorised") showError(`Cannot request retraining: ${error.message}`); }
}

function switchView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  if (name === "live") { state.liveCount = 0; $("#live-count").hidden = true; }
  if (name === "models") loadModels();
  if (name === "dashboard") document.dispatchEvent(new CustomEvent("anomalyd:dashboard"));
}

// --- wiring --------------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("#token").value.trim());
    $("#token").value = "";
    signedIn();
  });
  $("#signout").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    if (state.liveAbort) state.liveAbort.abort();
    clearInterval(state.refreshTimer);
    showLogin("");
  });
  $("#filters").addEventListener("submit", (event) => { event.preventDefault(); loadHistory(true); });
  $("#filters").addEventListener("reset", () => setTimeout(() => loadHistory(true), 0));
  $("#next-page").addEventListener("click", () => {
    if (!state.nextCursor) return;
    state.cursors[state.page + 1] = state.nextCursor; state.page += 1; loadHistory(false);
  });
  $("#prev-page").addEventListener("click", () => { if (state.page > 0) { state.page -= 1; loadHistory(false); } });
  $("#first-page").addEventListener("click", () => loadHistory(true));
  for (const id of ["#heatmap-opacity", "#mask-opacity", "#show-regions"]) $(id).addEventListener("input", applyOpacity);
  for (const button of document.querySelectorAll(".label-btn")) button.addEventListener("click", () => postLabel(button.dataset.label));
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => switchView(tab.dataset.view));
  $("#retrain").addEventListener("click", retrain);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshNow(); });
  if (token()) signedIn(); else showLogin("");
});
