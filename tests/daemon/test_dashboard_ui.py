"""The dashboard and the narrow layout in real headless Chromium (Debian's chromium driven by `playwright`).

A SQLite database holds three sources over six hours (normal and anomalous results, one source calibrated, one
without a line of its own) plus rejected frames. The dashboard must draw: per source one score plot with a dot per
non-empty 15-minute bucket at the bucket's highest score and the threshold in effect; per line one bar per hour at
the defect rate; the hourly inspected counts; tiles equal to the database's counts. The header stats and the
dashboard follow new inspections without a reload (after a live alert, and on the periodic refresh). At 800 px no
page is wider than the window. Screenshots go to the test's tmp dir; with ANOMALYD_WRITE_SCREENSHOT=1 the
dashboard is also saved as docs/dashboard.png (for the README).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from adapters.db import (
    Inspection,
    RejectedFrame,
    SourceThreshold,
    make_engine,
    make_session_factory,
    upgrade,
)
from adapters.storage import ArtifactStore
from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.config.settings import load_config
from daemon.telemetry.metrics import Metrics
from tests.daemon.test_api import TOKENS
from tests.daemon.test_ui_browser import (  # noqa: F401 (chromium_path is a fixture)
    CHROMIUM_ARGS,
    REPO,
    Server,
    chromium_path,
    seed,
    wait_js,
)

NOW = datetime.now(timezone.utc).replace(second=0, microsecond=0)
# cam1 and cam2 run on line-a; cam3 has no line configured (its rows say "default": it is its own line)
SOURCES = {"cam1": "line-a", "cam2": "line-a", "cam3": "default"}


def dashboard_rows(sessions) -> None:
    """Six hours of results, one frame per source every 20 minutes; every 5th one anomalous with a high score."""
    with sessions() as session, session.begin():
        for s_index, (source, line) in enumerate(SOURCES.items()):
            for step in range(18):
                when = NOW - timedelta(minutes=20 * step + 7 * s_index + 75)
                anomalous = (step + s_index) % 5 == 0
                score = round(0.7 + 0.02 * step, 3) if anomalous else round(0.1 + 0.015 * step + 0.05 * s_index, 3)
                session.add(Inspection(frame_id=f"d-{source}-{step}", source=source, line=line, captured_at=when,
                                       model_version="anomalyclip-v1", score=score,
                                       threshold=0.45 if source == "cam1" else 0.55, is_anomalous=anomalous))
        session.add_all([RejectedFrame(source="cam2", frame_id="bad-1", reason="not an image",
                                       created_at=NOW - timedelta(hours=2)),
                         RejectedFrame(source="cam3", frame_id="bad-2", reason="empty file",
                                       created_at=NOW - timedelta(hours=3)),
                         SourceThreshold(source="cam1", model_version="anomalyclip-v1", threshold=0.62,
                                         pixel_threshold=0.7, false_reject_rate=0.005, n_frames=20, method="test")])


def expected(sessions, after: datetime) -> dict:
    """What the plots must show, computed here in Python from the rows (the API computes it in SQL)."""
    with sessions() as session:
        rows = session.execute(select(Inspection.source, Inspection.line, Inspection.captured_at, Inspection.score,
                                      Inspection.is_anomalous).where(Inspection.captured_at >= after)).all()
        rejected = session.scalars(select(RejectedFrame.id).where(RejectedFrame.created_at >= after)).all()
    score_buckets: dict[str, dict[int, float]] = {}
    hours: dict[str, dict[int, list[int]]] = {}
    for source, line, when, score, anomalous in rows:
        epoch = int(when.replace(tzinfo=timezone.utc).timestamp())
        buckets = score_buckets.setdefault(source, {})
        buckets[epoch // 900] = max(buckets.get(epoch // 900, 0.0), score)
        counts = hours.setdefault(source if line == "default" else line, {}).setdefault(epoch // 3600, [0, 0])
        counts[0] += 1
        counts[1] += int(anomalous)
    return {"inspections": len(rows), "anomalous": sum(1 for row in rows if row[4]), "rejected": len(rejected),
            "score_maxima": {source: [buckets[key] for key in sorted(buckets)]
                             for source, buckets in score_buckets.items()},
            "rates": {line: [a / n for _, (n, a) in sorted(counts.items())] for line, counts in hours.items()},
            "hours": len({hour for counts in hours.values() for hour in counts})}


def fits(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth "
                         "&& document.body.scrollWidth <= window.innerWidth")


def right_edge(page, selector: str) -> float:
    return page.evaluate(f"Math.max(...[...document.querySelectorAll('{selector}')]"
                         ".map((node) => node.getBoundingClientRect().right))")


def test_dashboard_plots_refresh_and_800px(chromium_path, tmp_path):  # noqa: F811 (the fixture)
    from playwright.sync_api import expect, sync_playwright

    tokens = [{"name": "operator-1", "role": "operator", "token": TOKENS["operator"]}]
    settings = load_config(None, environ={}, overrides={
        "api": {"tokens": tokens}, "storage": {"dir": str(tmp_path / "artifacts")},
        "sources": [{"id": "cam1", "kind": "folder", "uri": str(tmp_path / "in1"), "threshold": 0.45,
                     "line": "line-a"},
                    {"id": "cam2", "kind": "folder", "uri": str(tmp_path / "in2"), "threshold": 0.55,
                     "line": "line-a"},
                    {"id": "cam3", "kind": "folder", "uri": str(tmp_path / "in3"), "threshold": 0.55}]})
    engine = make_engine(f"sqlite:///{tmp_path}/ui.db")
    upgrade(engine)
    sessions = make_session_factory(engine)
    store = ArtifactStore(tmp_path / "artifacts")
    ids = seed(sessions, store)  # 6 rows with artifacts in the last hour (cam1/line-a, cam2/line-b) and 2 models
    dashboard_rows(sessions)
    state = AppState(settings=settings, metrics=Metrics(), readiness=lambda: (True, {}), sessions=sessions,
                     store=store, extra={"events_poll_s": 0.2})
    errors: list[str] = []
    shots = tmp_path / "screenshots"
    shots.mkdir()

    with Server(create_app(state, routers())) as server, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda message: errors.append(message.text)
                    if "Content Security Policy" in message.text else None)
            # no failing API call (the browser's own favicon request aside)
            page.on("response", lambda response: errors.append(f"{response.status} {response.url}")
                    if response.status >= 400 and not response.url.endswith("/favicon.ico") else None)
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.evaluate("localStorage.setItem('anomalyd.refreshMs', '600000')")  # periodic refresh off for now
            page.fill("#token", TOKENS["operator"])
            page.click("#login-form button[type=submit]")
            expect(page.locator("#history tbody tr")).to_have_count(50)

            page.click(".tab[data-view=dashboard]")
            wait_js(page, "Number(document.body.dataset.dashboardLoaded) >= 1")
            after = datetime.fromisoformat(
                page.locator("#dash-status").text_content().split(" – ")[0].strip().replace(" ", "T") + "+00:00")
            want = expected(sessions, after.replace(microsecond=0))
            assert want["inspections"] == 6 + 54 and want["rejected"] == 2  # everything is inside the 24 h window

            # tiles: the database's counts
            expect(page.locator("#tile-inspected")).to_have_text(str(want["inspections"]))
            expect(page.locator("#tile-anomalous")).to_have_text(str(want["anomalous"]))
            expect(page.locator("#tile-rejected")).to_have_text("2")
            expect(page.locator("#tile-rate")).to_have_text(f"{100 * want['anomalous'] / want['inspections']:.1f} %")

            # score plots: one per source, a dot per non-empty bucket at its highest score, the threshold in effect
            expect(page.locator("#score-plots svg.plot")).to_have_count(3)
            for source, maxima in want["score_maxima"].items():
                dots = page.locator(f'#score-plots svg[data-source="{source}"] circle.max')
                expect(dots).to_have_count(len(maxima))
                drawn = [float(value) for value in dots.evaluate_all("(nodes) => nodes.map((n) => n.dataset.value)")]
                assert drawn == maxima, source
            thresholds = {source: page.locator(f'#score-plots svg[data-source="{source}"] line.threshold')
                          .get_attribute("data-value") for source in SOURCES}
            assert thresholds == {"cam1": "0.62", "cam2": "0.55", "cam3": "0.55"}  # cam1: calibrated
            expect(page.locator('#score-plots svg[data-source="cam1"] text.threshold-label')).to_have_text(
                "threshold 0.620 (calibrated)")
            # cam1's rows were judged at 0.45 and 0.5, not 0.62 (cam2's some at 0.5): the applied thresholds are drawn
            # too; cam3's rows were all judged at its threshold in effect
            expect(page.locator('#score-plots svg[data-source="cam1"] path.applied-threshold')).to_have_count(1)
            expect(page.locator('#score-plots svg[data-source="cam2"] path.applied-threshold')).to_have_count(1)
            expect(page.locator('#score-plots svg[data-source="cam3"] path.applied-threshold')).to_have_count(0)
            # dots at or above the threshold are red: the y of the threshold line is below (greater than) theirs
            over = page.evaluate("""() => {
                const svg = document.querySelector('#score-plots svg[data-source="cam1"]');
                const y = Number(svg.querySelector('line.threshold').getAttribute('y1'));
                return [...svg.querySelectorAll('circle.max')].map((c) => [c.classList.contains('over'),
                    Number(c.dataset.value) >= 0.62, Number(c.getAttribute('cy')) <= y]);
            }""")
            assert over and all(red == above == higher for red, above, higher in over)

            # defect rate per line per hour: line-a (cam1 + cam2 + seed's cam1), line-b (seed's cam2), cam3
            expect(page.locator("#rate-plots svg.plot")).to_have_count(len(want["rates"]))
            for line, rates in want["rates"].items():
                bars = page.locator(f'#rate-plots svg[data-line="{line}"] rect.rate')
                expect(bars).to_have_count(len(rates))
                drawn = [float(v) for v in bars.evaluate_all("(nodes) => nodes.map((n) => n.dataset.value)")]
                assert drawn == pytest.approx(rates), line
            expect(page.locator('#rate-plots svg[data-line="cam3"]')).to_have_count(1)
            expect(page.locator("#rate-plots figcaption")).to_contain_text([
                "cam3 · 3 of 18 anomalous", "line-a (cam1, cam2)", "line-b (cam2) · 1 of 3 anomalous"])
            # hourly inspected counts: one bar per hour, summing to the total
            inspected = page.locator("#count-plot rect.inspected")
            expect(inspected).to_have_count(want["hours"])
            assert sum(int(v) for v in inspected.evaluate_all("(n) => n.map((x) => x.dataset.count)")) == \
                want["inspections"]
            assert sum(int(v) for v in page.locator("#count-plot rect.rejected").evaluate_all(
                "(n) => n.map((x) => x.dataset.count)")) == 2
            page.screenshot(path=str(shots / "dashboard-1400.png"), full_page=True)
            if os.environ.get("ANOMALYD_WRITE_SCREENSHOT") == "1":  # the README's picture: the 6 h window
                loads = int(page.evaluate("document.body.dataset.dashboardLoaded"))
                page.select_option("#dash-window", "6")
                wait_js(page, f"Number(document.body.dataset.dashboardLoaded) > {loads}")
                page.screenshot(path=str(REPO / "docs" / "dashboard.png"), full_page=True)
                page.select_option("#dash-window", "24")
                wait_js(page, f"Number(document.body.dataset.dashboardLoaded) > {loads + 1}")

            # a new alert: the live feed triggers a refresh of the header stats and the shown dashboard
            expect(page.locator("#stats")).to_contain_text(
                f"{want['inspections']} inspected · {want['anomalous']} anomalous")
            with sessions() as session, session.begin():
                session.add(Inspection(frame_id="live-1", source="cam2", line="line-a", captured_at=NOW,
                                       model_version="anomalyclip-v1", score=0.93, threshold=0.8067259489874272,
                                       is_anomalous=True))
            expect(page.locator("#stats")).to_contain_text(
                f"{want['inspections'] + 1} inspected · {want['anomalous'] + 1} anomalous")
            expect(page.locator("#tile-anomalous")).to_have_text(str(want["anomalous"] + 1))
            expect(page.locator("#live-count")).to_have_text("1")
            # scores and thresholds are shown to 3 decimals, not at full float precision
            page.click(".tab[data-view=live]")
            expect(page.locator("#live tbody tr").first.locator("td").nth(4)).to_have_text("0.930")
            expect(page.locator("#live tbody tr").first.locator("td").nth(5)).to_have_text("0.807")

            # the periodic refresh: a normal inspection raises no alert, it shows up within the period
            page.evaluate("localStorage.setItem('anomalyd.refreshMs', '1000')")
            page.click("#signout")
            page.fill("#token", TOKENS["operator"])
            page.click("#login-form button[type=submit]")
            with sessions() as session, session.begin():
                session.add(Inspection(frame_id="quiet-1", source="cam3", line="default", captured_at=NOW,
                                       model_version="anomalyclip-v1", score=0.2, threshold=0.55, is_anomalous=False))
            expect(page.locator("#stats")).to_contain_text(f"{want['inspections'] + 2} inspected")
            assert page.locator("#live tbody tr").count() == 1  # the normal one is not an alert

            # 800 px: no page wider than the window, the history's label column and the models table in view
            page.set_viewport_size({"width": 800, "height": 900})
            width = page.evaluate("window.innerWidth")
            assert fits(page), "live page"
            page.screenshot(path=str(shots / "live-800.png"), full_page=True)
            page.click(".tab[data-view=history]")
            page.locator(f'#history tbody tr[data-id="{ids["cam2-3"]}"]').click()
            wait_js(page, "document.querySelector('#frame-img').naturalWidth === 320")
            expect(page.locator("#detail-facts")).to_contain_text("(threshold 0.500)")
            assert fits(page), "history page"
            assert right_edge(page, "#history th:last-child, #history td.label-cell") <= width
            assert page.locator("#history th:last-child").is_visible()
            page.screenshot(path=str(shots / "history-800.png"), full_page=True)
            page.click(".tab[data-view=models]")
            expect(page.locator("#models tbody tr")).to_have_count(2)
            assert fits(page), "models page"
            assert right_edge(page, "#models") <= width
            expect(page.locator("#models tbody")).to_contain_text("image_auroc 0.931")
            page.screenshot(path=str(shots / "models-800.png"), full_page=True)
            page.click(".tab[data-view=dashboard]")
            wait_js(page, "document.querySelectorAll('#score-plots svg.plot').length === 3")
            assert fits(page), "dashboard page"
            assert right_edge(page, "#score-plots svg.plot, #rate-plots svg.plot, #count-plot") <= width
            page.screenshot(path=str(shots / "dashboard-800.png"), full_page=True)
            page.click("#signout")
            assert fits(page), "login page"
            page.screenshot(path=str(shots / "login-800.png"), full_page=True)
        finally:
            context.close()
    engine.dispose()
    assert errors == []
    assert sorted(path.name for path in shots.iterdir()) == [
        "dashboard-1400.png", "dashboard-800.png", "history-800.png", "live-800.png", "login-800.png",
        "models-800.png"]
