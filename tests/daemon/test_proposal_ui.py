"""The Calibration page's proposed references in real headless Chromium (issue 23): a source that runs mutual scoring
(`references = "auto"`, no references yet) shows the known-good candidates the daemon proposes from its own frames,
and one click on Approve adds exactly those frames as the source's references (the managed folder) through the API;
a source in drift says so and proposes the frames since the drift's start. A PatchCore source shows no proposal."""

from __future__ import annotations

import uuid
from datetime import timedelta

import numpy as np

from adapters.db import Inspection, make_engine, make_session_factory, upgrade
from adapters.db.tables import DriftEvent
from adapters.storage import ArtifactStore
from adapters.timeutil import utc_now
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.config.settings import load_config
from daemon.references.files import own_reference_dir
from daemon.telemetry.metrics import Metrics
from daemon.zero_label.start import propose_references
from tests.daemon.test_api import TOKENS
from tests.daemon.test_ui_browser import CHROMIUM_ARGS, Server, chromium_path  # noqa: F401 (fixture)

N_FRAMES = 60


def _inspections(sessions, store, source: str, version: str, count: int, start) -> list[int]:
    ids = []
    for index in range(count):
        when = start + timedelta(seconds=index)
        rgb = np.full((120, 160, 3), 40 + index % 200, np.uint8)
        key = uuid.uuid4().hex
        paths = store.write(key, when, rgb=rgb, anomaly_map=np.zeros((120, 160), np.float32),
                            mask=np.zeros((120, 160), np.uint8), anomalous=False)
        row = Inspection(uuid=key, frame_id=f"{source}-{index}", source=source, line="line1",
                         frame_name=f"{source}_{index:03d}.png", captured_at=when, model_version=version,
                         score=0.2 + 0.002 * index, threshold=0.5, is_anomalous=False, regions=[], width=160,
                         height=120, frame_path=paths.frame)
        with sessions() as session, session.begin():
            session.add(row)
        ids.append(row.id)
    return ids


def test_proposed_references_are_approved_with_one_click_and_drift_is_shown(chromium_path, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    tokens = [{"name": "operator-1", "role": "operator", "token": TOKENS["operator"]}]
    settings = load_config(None, environ={}, overrides={
        "api": {"tokens": tokens}, "storage": {"dir": str(tmp_path / "artifacts")},
        "sources": [{"id": "new", "kind": "folder", "uri": str(tmp_path / "in1"), "references": "auto"},
                    {"id": "old", "kind": "folder", "uri": str(tmp_path / "in2")}]})
    engine = make_engine(f"sqlite:///{tmp_path}/ui.db")
    upgrade(engine)
    sessions = make_session_factory(engine)
    store = ArtifactStore(tmp_path / "artifacts")
    start = utc_now() - timedelta(hours=1)
    _inspections(sessions, store, "new", "mutual-efficientnet-lite0-t4-10-s256-w32-r1.35", N_FRAMES, start)
    _inspections(sessions, store, "old", "patchcore-efficientnet-lite0-t4-10-s256+ref-abc-k8", 3, start)
    expected = [frame["inspection_id"] for frame in propose_references(sessions, "new", 8)["frames"]]
    assert len(expected) == 8
    state = AppState(settings=settings, metrics=Metrics(), readiness=lambda: (True, {}), sessions=sessions,
                     store=store)
    errors: list[str] = []
    with Server(create_app(state, routers())) as server, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1100})
        try:
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", lambda dialog: dialog.accept())  # the approval's confirmation
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.fill("#token", TOKENS["operator"])
            page.click("#login-form button[type=submit]")
            page.click('.tab[data-view="calibration"]')
            page.select_option("#cal-source", "new")
            card = page.locator("#cal-proposal")
            expect(card).to_be_visible()
            expect(card.locator("figure.thumb")).to_have_count(8)
            shown = [int(x) for x in card.locator("figure.thumb").evaluate_all("els => els.map(e => e.dataset.id)")]
            assert shown == expected
            expect(page.locator("#cal-drift")).to_have_text("")
            page.click("#cal-approve")
            expect(page.locator("#cal-proposal-status")).to_contain_text("Approved 8 references")
            added = sorted(p.name for p in own_reference_dir(settings, "new").iterdir())
            assert len(added) == 8 and sorted(int(name.split("-")[1]) for name in added) == sorted(expected)
            expect(page.locator("#cal-references figure.thumb")).to_have_count(8)

            # a PatchCore source without a drift: no proposal card
            page.select_option("#cal-source", "old")
            expect(page.locator("#cal-status")).to_contain_text("patchcore-")
            expect(card).to_be_hidden()
            # ... in drift: the card says since when and proposes the frames since its start
            with sessions() as session, session.begin():
                session.add(DriftEvent(uuid=uuid.uuid4().hex, source="old", line="line1", model_version="mutual-x",
                                       started_at=start, detected_at=start + timedelta(seconds=2), frames=3,
                                       share=0.9, suppressed=2))
            page.click("#cal-refresh")
            expect(card).to_be_visible()
            expect(page.locator("#cal-drift")).to_contain_text("In drift since")
            expect(page.locator("#cal-drift")).to_contain_text("2 alerts held back")
        finally:
            context.close()
    assert errors == []
