"""The UI's Geometry tab in real headless Chromium (issue 20): on a source's newest frame the operator drags an ROI
and clicks an ignore polygon with the mouse, sees them drawn over the frame, saves; the API then answers that
geometry with the token's name, and what builds the source's bank uses it."""

from __future__ import annotations

import httpx

from adapters.db import make_engine, make_session_factory, upgrade
from adapters.storage import ArtifactStore
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.config.settings import load_config
from daemon.references import geometry_overrides as overrides
from daemon.telemetry.metrics import Metrics
from tests.daemon.test_api import TOKENS
from tests.daemon.test_ui_browser import CHROMIUM_ARGS, Server, chromium_path, seed  # noqa: F401 (fixture)

ROI_FROM, ROI_TO = (40, 30), (280, 200)  # frame pixels of the 320 x 240 frames `seed` writes
POLYGON = [(100, 60), (160, 60), (130, 120)]


def test_draw_roi_and_ignore_polygon_on_the_newest_frame_and_save(chromium_path, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    tokens = [{"name": "operator-1", "role": "operator", "token": TOKENS["operator"]}]
    settings = load_config(None, environ={}, overrides={
        "api": {"tokens": tokens}, "storage": {"dir": str(tmp_path / "artifacts")}, "model": {"name": "patchcore"},
        "sources": [{"id": "cam1", "kind": "folder", "uri": str(tmp_path / "in1"), "resize": "fit"},
                    {"id": "cam2", "kind": "folder", "uri": str(tmp_path / "in2")}]})
    engine = make_engine(f"sqlite:///{tmp_path}/ui.db")
    upgrade(engine)
    sessions = make_session_factory(engine)
    store = ArtifactStore(tmp_path / "artifacts")
    ids = seed(sessions, store)
    state = AppState(settings=settings, metrics=Metrics(), readiness=lambda: (True, {}), sessions=sessions,
                     store=store)
    errors: list[str] = []
    with Server(create_app(state, routers())) as server, sync_playwright() as playwright:
        base = f"http://127.0.0.1:{server.port}"
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1100})
        try:
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/")
            page.fill("#token", TOKENS["operator"])
            page.click("#login-form button[type=submit]")
            page.click(".tab[data-view=geometry]")
            expect(page.locator("#geo-source")).to_have_value("cam1")
            expect(page.locator("#geo-viewer")).to_have_attribute("data-ready", "true")
            expect(page.locator('#geo-facts dd[data-key="frame"]')).to_contain_text("320 × 240 (newest inspection)")
            expect(page.locator('#geo-facts dd[data-key="resize"]')).to_contain_text('"fit" ([[sources]] cam1)')
            assert page.evaluate("document.querySelector('#geo-frame').naturalWidth") == 320  # the frame is shown

            box = page.locator("#geo-overlay").bounding_box()
            assert box is not None and box["width"] > 100

            def at(x: float, y: float) -> tuple[float, float]:
                return box["x"] + x * box["width"] / 320, box["y"] + y * box["height"] / 240

            page.mouse.move(*at(*ROI_FROM))
            page.mouse.down()
            page.mouse.move(*at(160, 120), steps=4)
            page.mouse.move(*at(*ROI_TO), steps=4)
            page.mouse.up()
            expect(page.locator("#geo-roi-rect")).to_have_count(1)  # drawn over the frame
            page.click("#geo-mode-polygon")
            assert page.locator("#geo-overlay").bounding_box() == box  # the status line did not move the frame
            for point in POLYGON:
                page.mouse.click(*at(*point))
            page.mouse.click(*at(250, 220))  # a stray corner, taken back
            page.click("#geo-undo")
            expect(page.locator("#geo-overlay circle.geo-point")).to_have_count(3)
            page.click("#geo-close-polygon")
            expect(page.locator("#geo-overlay polygon.geo-ignore")).to_have_count(1)
            page.select_option("#geo-resize", "tile")
            page.fill("#geo-tile-size", "160")  # coarser tiles: each covers 160 frame pixels
            page.click("#geo-save")
            expect(page.locator("#geo-status")).to_contain_text("Saved")
            expect(page.locator('#geo-facts dd[data-key="tile size"]')).to_contain_text("160 px (override)")
            expect(page.locator('#geo-facts dd[data-key="roi"]')).to_contain_text("(override)")
            expect(page.locator("#geo-history li")).to_have_count(1)
            expect(page.locator("#geo-history li").first).to_contain_text("set by api:operator-1")

            # a geometry the API refuses: its reason is shown, nothing saved
            page.evaluate("geo.roi = [300, 200, 100, 100]")
            page.click("#geo-save")
            expect(page.locator("#error")).to_contain_text("reaches outside the 320x240 frame")
            expect(page.locator("#geo-history li")).to_have_count(1)

            shown = httpx.get(f"{base}/api/sources/cam1/geometry",
                              headers={"Authorization": f"Bearer {TOKENS['operator']}"}).json()
        finally:
            context.close()
    roi = shown["geometry"]["roi"]
    expected = [ROI_FROM[0], ROI_FROM[1], ROI_TO[0] - ROI_FROM[0], ROI_TO[1] - ROI_FROM[1]]
    assert all(abs(a - b) <= 2 for a, b in zip(roi, expected, strict=True)), (roi, expected)
    (polygon,) = shown["geometry"]["ignore_polygons"]
    assert len(polygon) == 3
    assert all(abs(p[0] - q[0]) <= 2 and abs(p[1] - q[1]) <= 2 for p, q in zip(polygon, POLYGON, strict=True)), polygon
    assert shown["geometry"]["resize"] == "tile" and shown["override"]["set_by"] == "api:operator-1"
    assert shown["frame"]["inspection_id"] == max(v for k, v in ids.items() if k.startswith("cam1"))
    geometry = overrides.effective_geometry(settings, "cam1")  # what the bank is built with from now on
    assert geometry.resize == "tile" and list(geometry.roi) == roi and geometry.tile_size == 160
    engine.dispose()
    assert errors == []
