// anomalyd operator UI, thresholds of the detail view's source: the value in effect with its origin (pinned,
// calibrated, configured) and last change, the newest changes (applied, proposed, pinned, unpinned: who, rule), and
// pin/unpin (operator; /api/sources/{id}/thresholds). Uses app.js's api helpers.
"use strict";

const thresholdState = { source: null };

function thresholdPath(suffix = "") {
  return `/api/sources/${encodeURIComponent(thresholdState.source)}/thresholds${suffix}`;
}

async function loadThresholds() {
  if (!thresholdState.source) return;
  try {
    const shown = await apiJson(thresholdPath());
    $("#threshold-value").textContent = shown.threshold.toFixed(3);
    $("#threshold-value").dataset.value = String(shown.threshold);
    $("#threshold-origin").dataset.origin = shown.origin;
    const last = shown.last_change;
    $("#threshold-origin").textContent = `(${shown.origin}` + (last ? `; last change ${last.action} by ${last.set_by}` : "") + ")";
    const history = await apiJson(thresholdPath("/history?limit=5"));
    $("#threshold-history").replaceChildren(...history.items.map((row) =>
      el("li", { "data-action": row.action }, `${utcText(row.created_at)} ${row.action} ${row.threshold.toFixed(3)} by ${row.set_by}: ${row.rule}`)));
  } catch (error) {
    $("#threshold-value").textContent = "–";
    $("#threshold-origin").textContent = error.message === "unauthorised" ? "" : `(${error.message})`;
  }
}

async function changePin(method) {
  const status = $("#threshold-status");
  const options = { method };
  if (method === "PUT") {
    const value = Number($("#pin-value").value);
    options.body = JSON.stringify({ threshold: value });
    options.headers = { "Content-Type": "application/json" };
  }
  try {
    await api(thresholdPath("/pin"), options);
    status.textContent = method === "PUT" ? "pinned" : "unpinned";
  } catch (error) {
    status.textContent = "";
    if (error.message !== "unauthorised") showError(`Cannot ${method === "PUT" ? "pin" : "unpin"} the threshold: ${error.message}`);
  }
  await loadThresholds();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#pin-form").addEventListener("submit", (event) => { event.preventDefault(); changePin("PUT"); });
  $("#unpin-threshold").addEventListener("click", () => changePin("DELETE"));
  document.addEventListener("anomalyd:detail", (event) => {
    thresholdState.source = event.detail.source;
    $("#threshold-status").textContent = "";
    loadThresholds();
  });
});
