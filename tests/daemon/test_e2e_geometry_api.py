"""End to end (issue 20): an ROI dragged and an ignore polygon drawn with the mouse in the UI (real headless Chromium)
on the newest frame while the daemon runs `patchcore` (real EfficientNet-Lite0 weights) take effect on the next
frames: a defect under the polygon and one outside the ROI pass, while one elsewhere still alerts with its box on
it; the bank's version carries the new geometry, it was recalibrated, and a restarted daemon keeps it."""

from __future__ import annotations

from pathlib import Path

import httpx
from sqlalchemy import select

from adapters.db import Inspection, SourceThreshold
from daemon.api import routers
from daemon.api.app import create_app
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.daemon.test_api import TOKENS, auth
from tests.daemon.test_e2e_geometry import _write
from tests.daemon.test_ui_browser import CHROMIUM_ARGS, Server, chromium_path  # noqa: F401 (fixture)
from tests.model.test_geometry import draw_defect, texture
from tests.waiting import wait_until

HEIGHT, WIDTH = 256, 512
MASKED, OPEN, OUTSIDE = (120, 128), (400, 128), (492, 128)  # x, y of the defects
POLYGON = [[80, 88], [160, 88], [160, 168], [80, 168]]
ROI_FROM, ROI_TO = (4, 4), (460, 252)  # the ROI dragged: OUTSIDE's strip is left out


def _settings(tmp_path: Path):
    return load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "references": str(tmp_path / "references")},
        "runtime": {"device": "cpu", "max_batch_delay_ms": 20, "shutdown_grace_s": 20, "max_batch_size": 4},
        "sources": [{"id": "line", "kind": "folder", "uri": str(tmp_path / "inbox"), "settle_s": 0.05,
                     "poll_interval_s": 0.05, "resize": "fit"}],
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")},
        "api": {"enabled": False, "tokens": [{"name": "operator-1", "role": "operator", "token": TOKENS["operator"]}]},
    })


def _inspect(service: Service, tmp_path: Path, name: str, rgb) -> Inspection:
    _write(tmp_path / "inbox" / name, rgb)

    def row() -> Inspection | None:
        with service.sessions() as session:
            return next((r for r in session.scalars(select(Inspection)) if Path(r.frame_name).name == name), None)

    assert wait_until(lambda: row() is not None, timeout=180), f"{name} not inspected"
    return row()


def _draw_roi_and_polygon_in_the_ui(base: str, chromium_path: str, profile: Path) -> None:  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1300, "height": 1000})
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/")
            page.fill("#token", TOKENS["operator"])
            page.click("#login-form button[type=submit]")
            page.click(".tab[data-view=geometry]")
            expect(page.locator("#geo-viewer")).to_have_attribute("data-ready", "true")
            expect(page.locator('#geo-facts dd[data-key="frame"]')).to_contain_text(f"{WIDTH} × {HEIGHT}")
            box = page.locator("#geo-overlay").bounding_box()

            def at(x: float, y: float) -> tuple[float, float]:
                return box["x"] + x * box["width"] / WIDTH, box["y"] + y * box["height"] / HEIGHT

            page.mouse.move(*at(*ROI_FROM))
            page.mouse.down()
            page.mouse.move(*at(200, 100), steps=4)
            page.mouse.move(*at(*ROI_TO), steps=4)
            page.mouse.up()
            expect(page.locator("#geo-roi-rect")).to_have_count(1)
            page.click("#geo-mode-polygon")
            for x, y in POLYGON:
                page.mouse.click(*at(x, y))
            page.keyboard.press("Enter")  # closes the polygon
            expect(page.locator("#geo-overlay polygon.geo-ignore")).to_have_count(1)
            page.click("#geo-save")
            expect(page.locator("#geo-status")).to_contain_text("Saved")
            assert errors == []
        finally:
            context.close()


def test_an_roi_and_an_ignore_polygon_drawn_in_the_ui_apply_to_the_next_frames_and_a_restart(
        tmp_path, chromium_path):  # noqa: F811
    for seed in (1, 2, 3):
        _write(tmp_path / "references" / f"good-{seed}.png", texture(HEIGHT, WIDTH, seed))
    (tmp_path / "inbox").mkdir()
    service = Service(_settings(tmp_path), serve_http=False)
    service.start()
    try:
        before = service.references.states["line"].version
        first = _inspect(service, tmp_path, "before.png", draw_defect(texture(HEIGHT, WIDTH, 7), *MASKED, radius=10))
        assert first.is_anomalous and first.model_version == before  # the spot alerts without the polygon
        edge = _inspect(service, tmp_path, "edge.png", draw_defect(texture(HEIGHT, WIDTH, 6), *OUTSIDE, radius=10))
        assert edge.is_anomalous  # and so does the one the ROI will leave out

        with Server(create_app(service.app_state(), routers())) as server:
            base = f"http://127.0.0.1:{server.port}"
            _draw_roi_and_polygon_in_the_ui(base, chromium_path, tmp_path / "profile")
            shown = httpx.get(f"{base}/api/sources/line/geometry", headers=auth("operator")).json()
        assert shown["frame"] == {"inspection_id": edge.id, "width": WIDTH, "height": HEIGHT,
                                  "frame_url": f"/api/inspections/{edge.id}/frame.jpg", "from": "newest inspection"}
        (polygon,) = shown["geometry"]["ignore_polygons"]
        assert all(abs(p[0] - q[0]) <= 2 and abs(p[1] - q[1]) <= 2 for p, q in zip(polygon, POLYGON, strict=True))
        roi = shown["geometry"]["roi"]
        expected = [*ROI_FROM, ROI_TO[0] - ROI_FROM[0], ROI_TO[1] - ROI_FROM[1]]
        assert all(abs(a - b) <= 2 for a, b in zip(roi, expected, strict=True)), (roi, expected)
        # the rebuilt detector is swapped in between batches
        assert wait_until(lambda: "-ign" in service.pipeline.detector.version_for("line"), timeout=180)
        after = service.pipeline.detector.version_for("line")
        assert after.startswith(before.split("+")[0] + "-roi{}x{}x{}x{}-ign".format(*roi)), (before, after)

        def calibrated() -> set[str]:
            with service.sessions() as session:
                return {row.model_version for row in session.scalars(select(SourceThreshold))}

        # the new version gets its own calibration (computed right after the bank is swapped in)
        assert wait_until(lambda: after in calibrated(), timeout=180), calibrated()

        passes = draw_defect(draw_defect(texture(HEIGHT, WIDTH, 8), *MASKED, radius=10), *OUTSIDE, radius=10)
        masked = _inspect(service, tmp_path, "masked.png", passes)
        assert masked.model_version == after and not masked.is_anomalous and masked.regions == []
        every = draw_defect(draw_defect(draw_defect(texture(HEIGHT, WIDTH, 9), *MASKED, radius=10), *OPEN, radius=10),
                            *OUTSIDE, radius=10)
        alert = _inspect(service, tmp_path, "open.png", every)
        assert alert.is_anomalous and alert.regions
        for region in alert.regions:  # boxes on the open defect only
            assert region["x"] - 16 <= OPEN[0] <= region["x"] + region["w"] + 16, region
    finally:
        service.stop()

    restarted = Service(_settings(tmp_path), serve_http=False)
    restarted.start()
    try:
        assert restarted.references.states["line"].version == after
    finally:
        restarted.stop()
