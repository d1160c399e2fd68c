"""The web UI in real headless Chromium (Debian's /usr/bin/chromium driven by the `playwright` package).

Starts the app with uvicorn on a free port over a SQLite database seeded with inspections and artifact files,
enters the token, filters, opens a defect (frame, heatmap and mask overlaid, regions boxed), labels it with a
mask upload and checks the label row in the database; a new alert shows up in the live view. With
ANOMALYD_WRITE_SCREENSHOT=1 it saves docs/ui.png (for the README).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from adapters.db import Inspection, Label, ModelVersion, make_engine, make_session_factory, upgrade
from adapters.storage import ArtifactStore
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.telemetry.metrics import Metrics
from tests.conftest import require
from tests.daemon.test_api import TOKENS, make_settings

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def synthetic_frame(seed: int, defect: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A brushed-metal-like 320x240 frame, its anomaly map and mask (a scratch when `defect`)."""
    rng = np.random.default_rng(seed)
    h, w = 240, 320
    base = 120 + 40 * np.sin(np.linspace(0, 3, w))[None, :] + rng.normal(0, 6, (h, w))
    base = cv2.GaussianBlur(base.astype(np.float32), (1, 15), 0)
    anomaly = np.zeros((h, w), np.float32)
    if defect:
        x0, y0 = int(rng.integers(60, 200)), int(rng.integers(50, 150))
        cv2.line(base, (x0, y0), (x0 + 60, y0 + 30), 40, 3)
        cv2.line(anomaly, (x0, y0), (x0 + 60, y0 + 30), 1.0, 9)
        anomaly = cv2.GaussianBlur(anomaly, (31, 31), 0)
        anomaly /= max(float(anomaly.max()), 1e-6)
    rgb = np.clip(np.stack([base, base * 1.02, base * 1.05], -1), 0, 255).astype(np.uint8)
    return rgb, anomaly, anomaly > 0.5


def seed(sessions, store) -> dict[str, int]:
    ids = {}
    specs = [("cam1", "line-a", 0.12, False), ("cam1", "line-a", 0.83, True), ("cam2", "line-b", 0.31, False),
             ("cam2", "line-b", 0.91, True), ("cam2", "line-b", 0.22, False), ("cam1", "line-a", 0.67, True)]
    for i, (source, line, score, anomalous) in enumerate(specs):
        when = NOW - timedelta(minutes=10 * (len(specs) - i))
        rgb, anomaly, mask = synthetic_frame(i, anomalous)
        key = uuid.uuid4().hex
        paths = store.write(key, when, rgb=rgb, anomaly_map=anomaly * score, mask=mask)
        regions = []
        if anomalous:
            ys, xs = np.nonzero(mask)
            regions = [{"x": int(xs.min()), "y": int(ys.min()), "w": int(xs.max() - xs.min() + 1),
                        "h": int(ys.max() - ys.min() + 1), "area": int(mask.sum()), "peak": score}]
        row = Inspection(uuid=key, frame_id=f"{source}-{i}", source=source, line=line, frame_name=f"frame_{i:04d}.png",
                         captured_at=when, model_version="anomalyclip-v1", score=score, threshold=0.5,
                         is_anomalous=anomalous, regions=regions, width=320, height=240, mask_path=paths.mask,
                         heatmap_path=paths.heatmap, frame_path=paths.frame)
        with sessions() as session, session.begin():
            session.add(row)
        ids[f"{source}-{i}"] = row.id
    with sessions() as session, session.begin():
        session.add_all([
            ModelVersion(version="anomalyclip-v1", kind="anomalyclip", status="active", activated_at=NOW,
                         metrics={"image_auroc": 0.914, "pixel_auroc": 0.957}),
            ModelVersion(version="retrain-0002", kind="anomalyclip", status="candidate",
                         metrics={"image_auroc": 0.931, "pixel_auroc": 0.962})])
    return ids


class Server:
    """uvicorn serving the app in a thread on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def chromium_path() -> str:
    path = next((p for p in CHROMIUM_CANDIDATES if Path(p).is_file()), shutil.which("chromium"))
    require(path is not None, "chromium is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import expect
    except ImportError:
        require(False, "the playwright package is not installed (pip install playwright)")
    # Playwright's assertions give up after 5 s by default; chromium on 2 busy CI cores can take longer to render.
    expect.set_options(timeout=30_000)
    return path


def wait_js(page, expression: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout}s: {expression}"
        time.sleep(0.05)


def test_ui_filter_open_label_live(chromium_path, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    engine = make_engine(f"sqlite:///{tmp_path}/ui.db")
    upgrade(engine)
    sessions = make_session_factory(engine)
    store = ArtifactStore(tmp_path / "artifacts")
    ids = seed(sessions, store)
    state = AppState(settings=make_settings(), metrics=Metrics(), readiness=lambda: (True, {}), sessions=sessions,
                     store=store, extra={"events_poll_s": 0.2})
    mask_png = tmp_path / "operator_mask.png"
    operator_mask = np.zeros((240, 320), np.uint8)
    operator_mask[100:140, 150:230] = 255
    cv2.imwrite(str(mask_png), operator_mask)
    errors: list[str] = []

    with Server(create_app(state, routers())) as server, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 900})
        try:
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # the UI must work under its Content-Security-Policy: a violation is an error
            page.on("console", lambda message: errors.append(message.text)
                    if "Content Security Policy" in message.text else None)
            page.goto(f"http://127.0.0.1:{server.port}/")

            # the token is asked for once, then kept in localStorage
            expect(page.locator("#login")).to_be_visible()
            page.fill("#token", TOKENS["operator"])
            page.click("#login-form button[type=submit]")
            rows = page.locator("#history tbody tr")
            expect(rows).to_have_count(6)
            assert page.evaluate("localStorage.getItem('anomalyd.token')") == TOKENS["operator"]

            # filter: anomalous frames of cam2 → one row
            page.fill("#filters input[name=source]", "cam2")
            page.select_option("#filters select[name=anomalous]", "true")
            page.click("#apply")
            expect(rows).to_have_count(1)
            target = ids["cam2-3"]
            expect(rows.first).to_have_attribute("data-id", str(target))
            # sort by score over everything
            page.click("#reset")
            page.select_option("#filters select[name=sort]", "score_desc")
            page.click("#apply")
            expect(rows).to_have_count(6)
            expect(rows.first).to_have_attribute("data-id", str(target))

            # open the defect: frame + heatmap images loaded, mask drawn, one region boxed
            rows.first.click()
            expect(page.locator("#detail")).to_be_visible()
            expect(page.locator("#detail-title")).to_contain_text(f"#{target}")
            # polled from here: Playwright's wait_for_function evaluates a string, which the UI's CSP forbids
            wait_js(page, "document.querySelector('#frame-img').naturalWidth === 320")
            wait_js(page, "document.querySelector('#heatmap-img').naturalWidth === 320")
            wait_js(page, "document.querySelector('#mask-canvas').width === 320")
            expect(page.locator("#regions rect")).to_have_count(1)
            page.fill("#heatmap-opacity", "0.3")
            assert page.evaluate("document.querySelector('#heatmap-img').style.opacity") == "0.3"

            # label it anomalous with a mask upload
            page.set_input_files("#mask-file", str(mask_png))
            page.click(".label-btn.anomalous")
            expect(page.locator("#label-status")).to_contain_text("Saved: anomalous with mask")
            expect(page.locator(f'#history tbody tr[data-id="{target}"] .label-cell')).to_have_text("anomalous")
            with sessions() as session:
                labels = session.scalars(select(Label).where(Label.inspection_id == target)).all()
            assert [(label.label, label.author) for label in labels] == [("anomalous", "operator-1")]
            assert store.path(labels[0].mask_path).read_bytes() == mask_png.read_bytes()

            expect(page.locator("#stats")).to_contain_text("labels 0 normal / 1 anomalous")
            if os.environ.get("ANOMALYD_WRITE_SCREENSHOT") == "1":
                page.fill("#heatmap-opacity", "0.7")
                (REPO / "docs").mkdir(exist_ok=True)
                page.screenshot(path=str(REPO / "docs" / "ui.png"))

            # live view: an alert inserted now appears without reloading
            rgb, anomaly, mask = synthetic_frame(99, True)
            key = uuid.uuid4().hex
            paths = store.write(key, NOW, rgb=rgb, anomaly_map=anomaly, mask=mask)
            with sessions() as session, session.begin():
                session.add(Inspection(uuid=key, frame_id="live-1", source="cam1", line="line-a", captured_at=NOW,
                                       model_version="anomalyclip-v1", score=0.88, threshold=0.5, is_anomalous=True,
                                       regions=[], width=320, height=240, mask_path=paths.mask,
                                       heatmap_path=paths.heatmap, frame_path=paths.frame))
            expect(page.locator("#live-count")).to_have_text("1")
            page.click(".tab[data-view=live]")
            expect(page.locator("#live tbody tr")).to_have_count(1)
            expect(page.locator("#live tbody tr").first).to_contain_text("0.880")

            # models page lists versions with metrics and an activate button
            page.click(".tab[data-view=models]")
            expect(page.locator("#models tbody tr")).to_have_count(2)
            expect(page.locator("#models tbody")).to_contain_text("image_auroc 0.931")
            expect(page.locator("#models tbody button")).to_have_count(1)
        finally:
            context.close()
    engine.dispose()
    assert errors == []
