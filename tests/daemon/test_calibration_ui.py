"""The UI's references and calibration page in real headless Chromium: reached from a frame's detail view, it shows
the threshold in effect with its origin (who set it), the histogram of recent frames in three colours, the
false-reject/miss curve of the labelled frames; a click on a curve point and Pin lands a `pinned` row with that
threshold in threshold_history (the existing pin path), Unpin another; reference thumbnails, a recent frame added
as a reference and a reference removed."""

from __future__ import annotations

import cv2
import numpy as np

from adapters.db import Label, SourceThreshold, make_engine, make_session_factory, upgrade
from adapters.storage import ArtifactStore
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.config.settings import load_config
from daemon.references import thresholds
from daemon.references.files import own_reference_dir
from daemon.telemetry.metrics import Metrics
from tests.daemon.test_api import TOKENS
from tests.daemon.test_ui_browser import CHROMIUM_ARGS, Server, chromium_path, seed  # noqa: F401 (fixture)


def test_calibration_page_shows_origin_and_pins_a_curve_point(chromium_path, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    tokens = [{"name": "operator-1", "role": "operator", "token": TOKENS["operator"]}]
    settings = load_config(None, environ={}, overrides={
        "api": {"tokens": tokens}, "storage": {"dir": str(tmp_path / "artifacts")},
        "sources": [{"id": "cam1", "kind": "folder", "uri": str(tmp_path / "in1"), "threshold": 0.5},
                    {"id": "cam2", "kind": "folder", "uri": str(tmp_path / "in2")}]})
    engine = make_engine(f"sqlite:///{tmp_path}/ui.db")
    upgrade(engine)
    sessions = make_session_factory(engine)
    store = ArtifactStore(tmp_path / "artifacts")
    ids = seed(sessions, store)  # cam1: 0.12, 0.83 (anomalous), 0.67 (anomalous); cam2: three more
    with sessions() as session, session.begin():
        session.add_all([Label(inspection_id=ids["cam1-0"], label="normal"),
                         Label(inspection_id=ids["cam1-1"], label="anomalous"),
                         SourceThreshold(source="cam1", model_version="anomalyclip-v1", threshold=0.6,
                                         pixel_threshold=0.7, false_reject_rate=0.005, n_frames=8, method="test")])
    thresholds.record(sessions, source="cam1", model_version="anomalyclip-v1", action="applied", threshold=0.6,
                      pixel_threshold=0.7, rule="order statistic of 8 known-good frames", set_by="daemon")
    folder = own_reference_dir(settings, "cam1")
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "ref-a.png"), np.full((240, 320, 3), 90, np.uint8))
    state = AppState(settings=settings, metrics=Metrics(), readiness=lambda: (True, {}), sessions=sessions,
                     store=store)
    errors: list[str] = []
    with Server(create_app(state, routers())) as server, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 1200})
        try:
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda message: errors.append(message.text)
                    if "Content Security Policy" in message.text else None)
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.fill("#token", TOKENS["operator"])
            page.click("#login-form button[type=submit]")
            page.locator(f'#history tbody tr[data-id="{ids["cam1-0"]}"]').click()
            page.click("#open-calibration")
            expect(page.locator("#view-calibration")).to_be_visible()
            expect(page.locator("#cal-source")).to_have_value("cam1")
            # the threshold in effect and where it came from
            expect(page.locator("#cal-threshold")).to_have_text("0.6000")
            expect(page.locator("#cal-origin")).to_have_attribute("data-origin", "calibrated")
            expect(page.locator("#cal-origin-detail")).to_contain_text(
                "applied by daemon at")
            expect(page.locator("#cal-origin-detail")).to_contain_text("order statistic of 8 known-good frames")
            # at 0.6 the normal 0.12 passes, the defect 0.83 alerts
            expect(page.locator("#cal-cost")).to_contain_text("0 of 1 labelled normals rejected")
            expect(page.locator("#cal-cost")).to_contain_text("0 of 1 labelled defects missed")
            # histogram: one bar per kind where its score is (25 bins)
            histogram = page.locator("#cal-histogram")
            expect(histogram.locator("rect.normal")).to_have_attribute("data-bin", "3")
            expect(histogram.locator("rect.anomalous")).to_have_attribute("data-bin", "20")
            expect(histogram.locator("rect.unlabelled")).to_have_attribute("data-bin", "16")  # 0.67
            expect(histogram.locator("line.threshold")).to_have_attribute("data-value", "0.6")
            colours = page.evaluate("""() => ['normal', 'anomalous', 'unlabelled'].map((kind) =>
                getComputedStyle(document.querySelector(`#cal-histogram rect.${kind}`)).fill)""")
            assert len(set(colours)) == 3, colours
            # curve of the two labels: thresholds 0.12 (all alert), 0.475 (between), 0.915 (none alert)
            points = page.locator("#cal-curve circle.curve-point")
            expect(points).to_have_count(3)
            expect(page.locator("#cal-curve rect.in-effect")).to_have_count(1)
            # the reference, with its thumbnail loaded through the token
            expect(page.locator('#cal-references figure[data-name="ref-a.png"] img')).to_have_js_property(
                "naturalWidth", 160)
            expect(page.locator("#cal-recent figure")).to_have_count(3)

            # choose the middle point (0 rejects, 0 misses) and pin it
            points.nth(1).click()
            expect(page.locator("#cal-pin-value")).to_have_value("0.4750")
            expect(page.locator("#cal-chosen")).to_contain_text("0 of 1 labelled normals rejected")
            page.click("#cal-pin")
            expect(page.locator("#cal-origin")).to_have_attribute("data-origin", "pinned")
            expect(page.locator("#cal-threshold")).to_have_text("0.4750")
            expect(page.locator("#cal-origin-detail")).to_contain_text("pinned by api:operator-1")
            expect(page.locator("#cal-history li").first).to_have_attribute("data-action", "pinned")
            page.click("#cal-unpin")
            expect(page.locator("#cal-origin")).to_have_attribute("data-origin", "calibrated")
            expect(page.locator("#cal-unpin")).to_be_disabled()
            # a typed value is pinned as typed
            page.fill("#cal-pin-value", "0.7")
            page.click("#cal-pin")
            expect(page.locator("#cal-threshold")).to_have_text("0.7000")

            # add the newest stored frame as a reference
            page.locator(f'#cal-recent figure[data-id="{ids["cam1-5"]}"] button.add-ref').click()
            expect(page.locator("#cal-ref-status")).to_contain_text(f"Added inspection {ids['cam1-5']} as ref-")
            expect(page.locator("#cal-references figure")).to_have_count(2)
            # and remove the first reference (after the browser's confirmation)
            page.once("dialog", lambda dialog: dialog.accept())
            page.locator('#cal-references figure[data-name="ref-a.png"] button.remove-ref').click()
            expect(page.locator("#cal-ref-status")).to_contain_text("Removed ref-a.png")
            expect(page.locator("#cal-references figure")).to_have_count(1)
            assert not (folder / "ref-a.png").exists()
            # an 800 px screen: nothing wider than the window
            page.set_viewport_size({"width": 800, "height": 1000})
            assert page.evaluate("document.documentElement.scrollWidth") <= 800

            # the source picker: cam2 has no labels, no curve
            page.select_option("#cal-source", "cam2")
            expect(page.locator("#cal-origin")).to_have_attribute("data-origin", "configured")
            expect(page.locator("#cal-curve-caption")).to_contain_text("No curve yet")
            expect(page.locator("#cal-curve circle.curve-point")).to_have_count(0)
        finally:
            context.close()
    history = [(r["action"], round(r["threshold"], 4), r["set_by"]) for r in thresholds.history(sessions, "cam1")]
    assert history == [("pinned", 0.7, "api:operator-1"), ("unpinned", 0.475, "api:operator-1"),
                       ("pinned", 0.475, "api:operator-1"), ("applied", 0.6, "daemon")]
    pinned = thresholds.history(sessions, "cam1")[2]
    assert pinned["threshold"] == (0.12 + 0.83) / 2 and pinned["pixel_threshold"] == 0.7  # exact, pixel kept
    engine.dispose()
    assert errors == []
