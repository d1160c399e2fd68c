"""The UI's references and score scale in real headless Chromium: the per-source score histogram (labelled normal
and anomalous in two colours, the calibrated thresholds of the source's model version drawn on it) and the
"Use as normal reference" button of the detail view (the frame lands in the source's reference folder)."""

from __future__ import annotations

from adapters.db import Label, SourceThreshold, make_engine, make_session_factory, upgrade
from adapters.storage import ArtifactStore
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.config.settings import load_config
from daemon.references.files import own_reference_dir
from daemon.telemetry.metrics import Metrics
from tests.daemon.test_api import TOKENS
from tests.daemon.test_ui_browser import CHROMIUM_ARGS, Server, chromium_path, seed  # noqa: F401 (fixture)


def test_histogram_and_use_as_reference(chromium_path, tmp_path):  # noqa: F811 (the fixture)
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
    state = AppState(settings=settings, metrics=Metrics(), readiness=lambda: (True, {}), sessions=sessions,
                     store=store)
    errors: list[str] = []
    with Server(create_app(state, routers())) as server, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 1000})
        try:
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.fill("#token", TOKENS["operator"])
            page.click("#login-form button[type=submit]")
            page.locator(f'#history tbody tr[data-id="{ids["cam1-0"]}"]').click()
            histogram = page.locator("#score-histogram")
            expect(histogram.locator("rect.normal")).to_have_count(1)
            expect(histogram.locator("rect.anomalous")).to_have_count(1)
            expect(histogram.locator("rect.unlabelled")).to_have_count(1)  # 0.67, not labelled
            # the normal 0.12 sits in bin 3 of 25, the anomalous 0.83 in bin 20: two colours where they belong
            expect(histogram.locator("rect.normal")).to_have_attribute("data-bin", "3")
            expect(histogram.locator("rect.anomalous")).to_have_attribute("data-bin", "20")
            expect(histogram.locator("line.threshold")).to_have_attribute("data-value", "0.6")
            expect(histogram.locator("line.pixel-threshold")).to_have_attribute("data-value", "0.7")
            colours = page.evaluate("""() => ['normal', 'anomalous'].map((kind) =>
                getComputedStyle(document.querySelector(`#score-histogram rect.${kind}`)).fill)""")
            assert colours[0] != colours[1]
            expect(page.locator("#histogram-caption")).to_contain_text("calibrated for anomalyclip-v1")

            page.click("#use-reference")
            expect(page.locator("#reference-status")).to_contain_text("Added as ref-")
            folder = own_reference_dir(settings, "cam1")
            added = sorted(p.name for p in folder.iterdir())
            assert len(added) == 1 and added[0].startswith(f"ref-{ids['cam1-0']}-")
            # a frame labelled anomalous is added with a warning naming it
            page.locator(f'#history tbody tr[data-id="{ids["cam1-1"]}"]').click()
            expect(page.locator("#detail-title")).to_contain_text(f"#{ids['cam1-1']}")
            page.click("#use-reference")
            expect(page.locator("#reference-status")).to_contain_text(f"inspection {ids['cam1-1']} was labelled "
                                                                      "anomalous")
            # cam2 has no calibration: its configured thresholds are drawn
            page.locator(f'#history tbody tr[data-id="{ids["cam2-2"]}"]').click()
            expect(page.locator("#histogram-caption")).to_contain_text("configured")
            expect(histogram.locator("line.threshold")).to_have_attribute("data-value", "0.5")
        finally:
            context.close()
    engine.dispose()
    assert errors == []
