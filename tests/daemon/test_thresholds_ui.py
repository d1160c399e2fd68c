"""The UI's thresholds panel in real headless Chromium: the threshold a source runs with and its origin, its newest
changes, and pin/unpin through the API (recorded in threshold_history with the token's name)."""

from __future__ import annotations

from adapters.db import SourceThreshold, make_engine, make_session_factory, upgrade
from adapters.storage import ArtifactStore
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.config.settings import load_config
from daemon.references import thresholds
from daemon.telemetry.metrics import Metrics
from tests.daemon.test_api import TOKENS
from tests.daemon.test_ui_browser import CHROMIUM_ARGS, Server, chromium_path, seed  # noqa: F401 (fixture)


def test_threshold_in_effect_with_its_origin_and_pin_from_the_ui(chromium_path, tmp_path):  # noqa: F811
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
    ids = seed(sessions, store)
    with sessions() as session, session.begin():
        session.add(SourceThreshold(source="cam1", model_version="anomalyclip-v1", threshold=0.6, pixel_threshold=0.7,
                                    false_reject_rate=0.005, n_frames=8, method="test"))
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
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.fill("#token", TOKENS["operator"])
            page.click("#login-form button[type=submit]")
            page.locator(f'#history tbody tr[data-id="{ids["cam1-0"]}"]').click()
            expect(page.locator("#threshold-origin")).to_have_attribute("data-origin", "calibrated")
            expect(page.locator("#threshold-value")).to_have_text("0.600")
            page.fill("#pin-value", "0.9")
            page.click("#pin-threshold")
            expect(page.locator("#threshold-origin")).to_have_attribute("data-origin", "pinned")
            expect(page.locator("#threshold-value")).to_have_text("0.900")
            expect(page.locator("#threshold-history li").first).to_have_attribute("data-action", "pinned")
            expect(page.locator("#threshold-origin")).to_contain_text("by api:operator-1")
            page.click("#unpin-threshold")
            expect(page.locator("#threshold-origin")).to_have_attribute("data-origin", "calibrated")
            expect(page.locator("#threshold-history li")).to_have_count(2)
            page.click("#unpin-threshold")  # nothing pinned any more: the API's reason is shown
            expect(page.locator("#error")).to_contain_text("no pinned threshold")
            # cam2 has neither: its configured threshold
            page.locator(f'#history tbody tr[data-id="{ids["cam2-2"]}"]').click()
            expect(page.locator("#threshold-origin")).to_have_attribute("data-origin", "configured")
        finally:
            context.close()
    assert [(r["action"], r["threshold"], r["set_by"]) for r in thresholds.history(sessions, "cam1")] == [
        ("unpinned", 0.9, "api:operator-1"), ("pinned", 0.9, "api:operator-1")]
    engine.dispose()
    assert errors == []
