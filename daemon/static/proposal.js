// The Calibration page's "Proposed references" card (issue 23): a source that starts with no references (mutual
// scoring, `references = "auto"`) or that is in drift gets known-good candidates from its own frames
// (GET /api/sources/{id}/references/proposal, daemon/zero_label/start.py); one click approves them (POST .../references),
// which switches the source to PatchCore on them. Uses calibration.js's calState, calPath, thumb and loadCalibration.
"use strict";

// `ticket`: calibration.js's load this belongs to; a newer load (another source picked) wins, so nothing stale is drawn.
async function renderProposal(data, ticket) {
  const card = $("#cal-proposal");
  const mutual = (data.model_version || "").startsWith("mutual-");
  let drift = null;
  try {
    drift = await apiJson(calPath("/drift?limit=1"));
  } catch (error) {
    drift = null;  // a family without a drift watch: nothing to show
  }
  if (ticket !== calState.loading) return;
  const drifting = Boolean(drift && drift.drifting && drift.current);
  card.hidden = !(mutual || drifting);
  if (card.hidden) return;
  const since = drifting ? `&since=${encodeURIComponent(drift.current.started_at)}` : "";
  $("#cal-drift").textContent = drifting
    ? `In drift since ${utcWhen(drift.current.started_at)}: ${drift.current.frames} frames, ` +
      `${drift.current.suppressed} alerts held back (no decision). Approve references of the new product below.`
    : "";
  let proposal;
  try {
    proposal = await apiJson(calPath(`/references/proposal?count=8${since}`));
  } catch (error) {
    if (error.message !== "unauthorised") showError(`Cannot load the proposed references: ${error.message}`);
    return;
  }
  if (ticket !== calState.loading) return;
  $("#cal-proposal-caption").textContent = proposal.message || "";
  const frames = proposal.frames || [];
  $("#cal-proposed").replaceChildren(...frames.map((frame) => el("figure", { class: "thumb", "data-id": frame.inspection_id },
    thumb(`/api/inspections/${frame.inspection_id}/frame.jpg`, `inspection ${frame.inspection_id}`),
    el("figcaption", {}, el("span", {}, `#${frame.inspection_id} · ${score(frame.score)}`)))));
  const approve = $("#cal-approve");
  approve.hidden = !proposal.ready || !frames.length;
  approve.textContent = `Approve these ${frames.length} as references`;
  approve.onclick = () => approveProposal(frames.map((frame) => frame.inspection_id));
}

async function approveProposal(ids) {
  if (!confirm(`Use these ${ids.length} frames of ${calState.source} as its normal references? ` +
               "The source then runs PatchCore on them, calibrated.")) return;
  $("#cal-proposal-status").textContent = "approving…";
  try {
    const body = await apiJson(calPath("/references"), { method: "POST", body: JSON.stringify({ inspection_ids: ids }),
      headers: { "Content-Type": "application/json" } });
    const warnings = body.warnings.length ? ` Warning: ${body.warnings.join("; ")}` : "";
    $("#cal-proposal-status").textContent = `Approved ${body.added.length} references; the bank is built.${warnings}`;
  } catch (error) {
    $("#cal-proposal-status").textContent = "";
    if (error.message !== "unauthorised") showError(`Cannot approve the proposed references: ${error.message}`);
  }
  await loadCalibration();
}
