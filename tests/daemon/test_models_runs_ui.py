"""The Models page shows the recent retraining runs: a failed one (which registers no version) with its reason, a
refused "Retrain now" with the 409's detail. Real headless Chromium against the real API on SQLite."""

from __future__ import annotations

from adapters.db import TrainingRun, make_engine, make_session_factory, upgrade
from adapters.storage import ArtifactStore
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.telemetry.metrics import Metrics
from tests.daemon.test_api import TOKENS, make_settings
from tests.daemon.test_ui_browser import CHROMIUM_ARGS, Server, chromium_path  # noqa: F401  (the fixture)


def test_models_page_shows_a_failed_run_and_a_refusal(chromium_path, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    engine = make_engine(f"sqlite:///{tmp_path}/ui.db")
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        session.add(TrainingRun(status="failed", params={"trigger": "api"},
                                log="2026-12-07 10:00:00 failed: no source of the labelled frames (cam1) has 2 or more "
                                    "references: a head is trained on its source's PatchCore bank; add references"))
    settings = make_settings()
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"name": "patchcore"})})
    state = AppState(settings=settings, metrics=Metrics(), readiness=lambda: (True, {}), sessions=sessions,
                     store=ArtifactStore(tmp_path / "artifacts"))
    errors: list[str] = []
    with Server(create_app(state, routers())) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.fill("#token", TOKENS["admin"])
            page.click("#login-form button[type=submit]")
            page.click(".tab[data-view=models]")
            runs = page.locator("#model-runs tbody tr")
            expect(runs).to_have_count(1)
            expect(runs.first).to_contain_text("failed")
            expect(runs.first).to_contain_text("no source of the labelled frames (cam1) has 2 or more references")
            page.on("dialog", lambda dialog: dialog.accept())
            page.click("#retrain")  # no labelled defect yet: refused with the count
            expect(page.locator("body")).to_contain_text("0 frame(s) labelled anomalous, at least 4 needed")
        finally:
            browser.close()
    engine.dispose()
    assert errors == []
