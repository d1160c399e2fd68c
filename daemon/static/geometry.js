// anomalyd operator UI, frame geometry of a source (the Geometry tab; /api/sources/{id}/geometry): on the source's
// newest frame the operator drags a rectangle for the region of interest and clicks the corners of polygons that are
// never inspected (fixtures, labels), picks how the frame is fed to the model (resize), and saves. The daemon then
// rebuilds the source's bank through the new geometry and recalibrates. Coordinates are the frame's own pixels.
// Uses app.js's api helpers; builds its own controls inside #view-geometry.
"use strict";

const geo = { source: null, frame: null, roi: null, polygons: [], pending: [], mode: "roi", drag: null, url: null };
const SVG_NS = "http://www.w3.org/2000/svg";

function geoNode(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function geoPath(suffix = "") { return `/api/sources/${encodeURIComponent(geo.source)}/geometry${suffix}`; }

function buildGeometryView() {
  const view = $("#view-geometry");
  const button = (id, text, attrs = {}) => el("button", Object.assign({ type: "button", id }, attrs), text);
  view.replaceChildren(
    el("div", { class: "geo-toolbar" },
      el("label", {}, "Source ", el("select", { id: "geo-source" })),
      el("label", {}, "Resize ", el("select", { id: "geo-resize" },
        el("option", { value: "" }, "keep"), el("option", { value: "squash" }, "squash"),
        el("option", { value: "fit" }, "fit"), el("option", { value: "tile" }, "tile"),
        el("option", { value: "auto" }, "auto (tiles for long frames)"))),
      el("label", { title: "tile and auto modes: frame pixels each tile covers; empty keeps it, 0 = native resolution (auto: the short side of a long frame)" },
        "Tile size ", el("input", { id: "geo-tile-size", type: "number", min: "0", max: "16384", step: "1", placeholder: "keep", size: "6" }), " px"),
      button("geo-mode-roi", "Draw ROI", { class: "geo-mode active", "data-mode": "roi" }),
      button("geo-mode-polygon", "Add ignore polygon", { class: "geo-mode", "data-mode": "polygon" }),
      button("geo-close-polygon", "Close polygon"),
      button("geo-undo", "Undo"),
      button("geo-clear-roi", "Whole frame"),
      button("geo-clear-polygons", "No polygons"),
      button("geo-save", "Save", { class: "primary" }),
      button("geo-reset", "Back to config")),
    el("p", { class: "hint", id: "geo-help" }, "Draw ROI: drag a rectangle on the frame. Add ignore polygon: click its " +
      "corners, then Close polygon (or Enter); Undo takes back the last corner or polygon. Save applies it: the source's bank is rebuilt and recalibrated."),
    el("p", { class: "hint", id: "geo-status", role: "status" }),
    el("div", { class: "geo-viewer", id: "geo-viewer" }, el("img", { id: "geo-frame", alt: "newest frame" }),
      geoNode("svg", { id: "geo-overlay", preserveAspectRatio: "none" })),
    el("dl", { id: "geo-facts", class: "facts" }),
    el("h3", {}, "Changes"),
    el("ol", { id: "geo-history", class: "hint" }));
  $("#geo-source").addEventListener("change", () => loadGeometry($("#geo-source").value));
  for (const mode of document.querySelectorAll(".geo-mode")) mode.addEventListener("click", () => setMode(mode.dataset.mode));
  $("#geo-close-polygon").addEventListener("click", closePolygon);
  $("#geo-undo").addEventListener("click", undo);
  $("#geo-clear-roi").addEventListener("click", () => { geo.roi = null; drawOverlay(); });
  $("#geo-clear-polygons").addEventListener("click", () => { geo.polygons = []; geo.pending = []; drawOverlay(); });
  $("#geo-save").addEventListener("click", saveGeometry);
  $("#geo-reset").addEventListener("click", resetGeometry);
  const svg = $("#geo-overlay");
  svg.addEventListener("pointerdown", pointerDown);
  svg.addEventListener("pointermove", pointerMove);
  svg.addEventListener("pointerup", pointerUp);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !$("#view-geometry").hidden && geo.pending.length) closePolygon();
  });
}

function setMode(mode) {
  geo.mode = mode;
  for (const button of document.querySelectorAll(".geo-mode")) button.classList.toggle("active", button.dataset.mode === mode);
}

function geoStatus(text) { $("#geo-status").textContent = text; }

// A pointer position in the frame's pixels (clamped to the frame).
function framePoint(event) {
  const box = $("#geo-overlay").getBoundingClientRect();
  const x = ((event.clientX - box.left) / box.width) * geo.frame.width;
  const y = ((event.clientY - box.top) / box.height) * geo.frame.height;
  return [Math.round(Math.min(geo.frame.width, Math.max(0, x))), Math.round(Math.min(geo.frame.height, Math.max(0, y)))];
}

function pointerDown(event) {
  if (!geo.frame || event.button !== 0) return;
  event.preventDefault();
  const point = framePoint(event);
  if (geo.mode === "polygon") { geo.pending.push(point); drawOverlay(); return; }
  $("#geo-overlay").setPointerCapture(event.pointerId);
  geo.drag = { start: point, end: point };
  drawOverlay();
}

function pointerMove(event) {
  if (!geo.drag) return;
  geo.drag.end = framePoint(event);
  drawOverlay();
}

function pointerUp(event) {
  if (!geo.drag) return;
  geo.drag.end = framePoint(event);
  const [x0, y0] = geo.drag.start, [x1, y1] = geo.drag.end;
  geo.drag = null;
  const roi = [Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0)];
  if (roi[2] < 8 || roi[3] < 8) geoStatus("The ROI must be at least 8 × 8 pixels; drag a larger rectangle.");
  else { geo.roi = roi; geoStatus(`ROI ${roi.join(", ")} (not saved yet)`); }
  drawOverlay();
}

function closePolygon() {
  if (geo.pending.length < 3) { geoStatus("An ignore polygon needs at least 3 corners."); return; }
  geo.polygons.push(geo.pending);
  geo.pending = [];
  geoStatus(`${geo.polygons.length} ignore polygon(s) (not saved yet)`);
  drawOverlay();
}

// The last corner of the polygon being drawn, else the last closed polygon.
function undo() {
  if (geo.pending.length) geo.pending.pop(); else geo.polygons.pop();
  drawOverlay();
}

function drawOverlay() {
  const svg = $("#geo-overlay");
  if (!geo.frame) { svg.replaceChildren(); return; }
  const { width, height } = geo.frame;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const nodes = [];
  const shown = geo.drag ? [Math.min(geo.drag.start[0], geo.drag.end[0]), Math.min(geo.drag.start[1], geo.drag.end[1]),
    Math.abs(geo.drag.end[0] - geo.drag.start[0]), Math.abs(geo.drag.end[1] - geo.drag.start[1])] : geo.roi;
  if (shown) {
    const [x, y, w, h] = shown;  // what is outside the ROI is darkened
    nodes.push(geoNode("path", { class: "geo-outside", d: `M0 0H${width}V${height}H0Z M${x} ${y}h${w}v${h}h${-w}Z` }));
    nodes.push(geoNode("rect", { id: "geo-roi-rect", class: "geo-roi", x, y, width: w, height: h }));
  }
  geo.polygons.forEach((polygon, index) => nodes.push(geoNode("polygon", {
    class: "geo-ignore", "data-index": index, points: polygon.map((p) => p.join(",")).join(" ") })));
  if (geo.pending.length) {
    nodes.push(geoNode("polyline", { class: "geo-pending", points: geo.pending.map((p) => p.join(",")).join(" ") }));
    const radius = Math.max(2, Math.max(width, height) / 150);
    for (const [x, y] of geo.pending) nodes.push(geoNode("circle", { class: "geo-point", cx: x, cy: y, r: radius }));
  }
  svg.replaceChildren(...nodes);
}

async function loadSources() {
  try {
    const data = await apiJson("/api/geometry");
    const select = $("#geo-source");
    select.replaceChildren(...data.items.map((item) => el("option", { value: item.source },
      item.source + (item.overridden ? " (set here)" : ""))));
    if (!data.items.length) { geoStatus("No configured sources."); return; }
    const keep = data.items.some((item) => item.source === geo.source) ? geo.source : data.items[0].source;
    select.value = keep;
    await loadGeometry(keep);
  } catch (error) { if (error.message !== "unauthorised") showError(`Cannot load the sources: ${error.message}`); }
}

function showSummary(shown) {
  geo.frame = shown.frame;
  geo.roi = shown.geometry.roi;
  geo.polygons = shown.geometry.ignore_polygons.map((polygon) => polygon.map((p) => p.map(Math.round)));
  geo.pending = [];
  $("#geo-resize").value = "";
  $("#geo-tile-size").value = "";
  const origin = (key) => `${JSON.stringify(shown.geometry[key])} (${shown.origins[key]})`;
  const facts = [["resize", origin("resize")], ["roi", origin("roi")],
    ["ignore polygons", `${shown.geometry.ignore_polygons.length} (${shown.origins.ignore_polygons})`],
    ["tile size", `${shown.geometry.tile_size ? `${shown.geometry.tile_size} px`
      : shown.geometry.resize === "auto" ? "the short side of a long frame" : "native"} (${shown.origins.tile_size})`],
    ["frame", shown.frame ? `${shown.frame.width} × ${shown.frame.height} (${shown.frame.from})` : "no frame yet"]];
  if (shown.override) facts.push(["set here", `by ${shown.override.set_by} at ${utcText(shown.override.set_at)}`]);
  if (shown.bank) facts.push(["bank", `${shown.bank.version || "–"}${shown.bank.error ? ` · ${shown.bank.error}` : ""}${shown.bank.warning ? ` · ${shown.bank.warning}` : ""}`]);
  if (!shown.supported) facts.push(["note", "this model family inspects whole frames squashed: only resize squash, no ROI or polygons"]);
  $("#geo-facts").replaceChildren(...facts.flatMap(([key, value]) => [el("dt", {}, key), el("dd", { "data-key": key }, value)]));
  $("#geo-facts").dataset.origin = shown.origins.roi;
  drawOverlay();
}

async function loadGeometry(source) {
  geo.source = source;
  try {
    const shown = await apiJson(geoPath());
    showSummary(shown);
    const image = $("#geo-frame");
    if (geo.url) { URL.revokeObjectURL(geo.url); geo.url = null; }
    image.removeAttribute("src");
    $("#geo-viewer").classList.toggle("blank", !(shown.frame && shown.frame.frame_url));
    if (shown.frame && shown.frame.frame_url) {
      const response = await api(shown.frame.frame_url);
      geo.url = URL.createObjectURL(await response.blob());
      image.src = geo.url;
      await image.decode().catch(() => undefined);
      fitFrame(image);
    } else if (!shown.frame) {
      geoStatus("No frame of this source yet: the geometry can be drawn once a frame was inspected or a reference exists.");
    }
    $("#geo-viewer").dataset.ready = "true";
    await loadGeometryHistory();
  } catch (error) { if (error.message !== "unauthorised") showError(`Cannot load the geometry of ${source}: ${error.message}`); }
}

// Shown as large as the page allows (a small frame is enlarged, so its pixels can be aimed at), aspect kept.
function fitFrame(image) {
  const width = image.naturalWidth, height = image.naturalHeight;
  if (!width || !height) return;
  const room = $("#view-geometry").clientWidth || width;
  const scale = Math.min(room / width, (0.7 * window.innerHeight) / height);
  image.style.width = `${Math.round(width * scale)}px`;
  image.style.height = `${Math.round(height * scale)}px`;
}

async function loadGeometryHistory() {
  const history = await apiJson(geoPath("/history?limit=5"));
  $("#geo-history").replaceChildren(...history.items.map((event) => el("li", { "data-action": event.action },
    `${utcText(event.set_at)} ${event.action} by ${event.set_by}: resize ${event.after.resize}, roi ` +
    `${JSON.stringify(event.after.roi)}, ${event.after.ignore_polygons.length} ignore polygon(s)` +
    (event.after.tile_size ? `, tiles of ${event.after.tile_size} px` : ""))));
}

async function saveGeometry() {
  if (geo.pending.length >= 3) closePolygon();
  const body = { roi: geo.roi, ignore_polygons: geo.polygons };
  if ($("#geo-resize").value) body.resize = $("#geo-resize").value;
  const tileSize = $("#geo-tile-size").value.trim();
  if (tileSize !== "") body.tile_size = Number(tileSize) > 0 ? Math.round(Number(tileSize)) : null;
  geoStatus("saving…");
  try {
    const shown = await apiJson(geoPath(), { method: "PUT", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
    showSummary(shown);
    await loadGeometryHistory();
    geoStatus(`Saved. The bank of ${geo.source} is rebuilt through this geometry and recalibrated.`);
  } catch (error) {
    geoStatus("");
    if (error.message !== "unauthorised") showError(`Cannot save the geometry: ${error.message}`);
  }
}

async function resetGeometry() {
  try {
    showSummary(await apiJson(geoPath(), { method: "DELETE" }));
    await loadGeometryHistory();
    geoStatus("Back to the configured geometry.");
  } catch (error) {
    if (error.message !== "unauthorised") showError(`Cannot reset the geometry: ${error.message}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  buildGeometryView();
  const tab = document.querySelector('.tab[data-view="geometry"]');
  if (tab) tab.addEventListener("click", () => { showError(""); loadSources(); });
});
