"""`GET /api/stats/series` (the dashboard's data) on real SQLite and PostgreSQL: UTC hour buckets per line and per
source (counts, defect rate, mean/max score, thresholds applied and in effect, rejected frames), the window, bounds
and errors. The buckets are computed in SQL, so both backends must agree with what Python computes here."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from adapters.db import Inspection, RejectedFrame, SourceThreshold, history
from tests.daemon.test_api import Env, auth, create_pg_database

NOW = datetime(2026, 6, 3, 12, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)
# (source, line, minutes before NOW, score, threshold, anomalous); cam3 runs without a configured line
ROWS = [("cam1", "line-a", 170, 0.20, 0.5, False), ("cam1", "line-a", 150, 0.81, 0.5, True),
        ("cam1", "line-a", 125, 0.30, 0.5, False), ("cam1", "line-a", 59, 0.40, 0.6, False),
        ("cam1", "line-a", 1, 0.91, 0.6, True),
        ("cam2", "line-a", 119, 0.10, 0.5, False), ("cam2", "line-a", 61, 0.70, 0.5, True),
        ("cam2", "line-a", 30, 0.60, 0.5, False),  # with cam1's 11:xx rows in line-a's 11:00 bucket
        ("cam2", "line-b", 200, 0.20, 0.5, False),  # cam2 moved from line-b to line-a
        ("cam3", "default", 30, 0.35, 0.45, False), ("cam3", "default", 29, 0.55, 0.45, True),
        ("cam1", "line-a", 60 * 30, 0.99, 0.5, True)]  # 30 h ago: outside the default 24 h window


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def env(request, tmp_path):
    url = f"sqlite:///{tmp_path}/series.db" if request.param == "sqlite" else create_pg_database(
        request.getfixturevalue("postgres").url)
    environment = Env(url, tmp_path)
    with environment.sessions() as session, session.begin():
        for i, (source, line, minutes, score, threshold, anomalous) in enumerate(ROWS):
            session.add(Inspection(frame_id=f"s{i}", source=source, line=line,
                                   captured_at=NOW - timedelta(minutes=minutes, seconds=0.4), model_version="v1",
                                   score=score, threshold=threshold, is_anomalous=anomalous))
        session.add(Inspection(frame_id="err", source="cam2", line="line-a", captured_at=NOW - 2 * HOUR,
                               model_version="v1", score=None, threshold=0.5, is_anomalous=False, error="boom"))
        session.add_all([RejectedFrame(source="cam2", frame_id="bad1", reason="not an image",
                                       created_at=NOW - 30 * timedelta(minutes=1)),
                         RejectedFrame(source="cam4", frame_id="bad2", reason="empty", created_at=NOW - 2 * HOUR),
                         SourceThreshold(source="cam1", model_version="v1", threshold=0.65, pixel_threshold=0.7,
                                         false_reject_rate=0.01, n_frames=10, method="test")])
    yield environment
    environment.close()


def get(env, **params):
    response = env.client.get("/api/stats/series", params={"before": NOW.isoformat(), **params},
                              headers=auth("viewer"))
    assert response.status_code == 200, response.text
    return response.json()


def test_defect_rate_per_line_per_hour(env):
    data = get(env)
    assert data["bucket_s"] == 3600 and data["by"] == "line" and data["truncated"] is False
    groups = {group["key"]: group for group in data["groups"]}
    # cam3 has no line of its own: it is its line; cam4 only has a rejected frame
    assert sorted(groups) == ["cam3", "cam4", "line-a", "line-b"]
    assert groups["line-b"]["sources"] == ["cam2"] and groups["line-b"]["points"][0]["t"] == "2026-06-03T08:00:00Z"
    line_a = groups["line-a"]
    assert line_a["sources"] == ["cam1", "cam2"]
    # hours 09:00, 10:00 and 11:00 UTC (each row sits 0.4 s before its minute mark)
    assert [point["t"] for point in line_a["points"]] == ["2026-06-03T09:00:00Z", "2026-06-03T10:00:00Z",
                                                          "2026-06-03T11:00:00Z"]
    assert [(p["inspections"], p["anomalous"]) for p in line_a["points"]] == [(3, 1), (3, 1), (3, 1)]
    assert [p["defect_rate"] for p in line_a["points"]] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert line_a["points"][0]["max_score"] == pytest.approx(0.81)
    assert line_a["points"][1]["mean_score"] == pytest.approx((0.10 + 0.70) / 2)  # the error row has no score
    # two sources in one bucket: scores and thresholds over both
    assert line_a["points"][2]["mean_score"] == pytest.approx((0.40 + 0.91 + 0.60) / 3)
    assert line_a["points"][2]["max_score"] == pytest.approx(0.91)
    assert (line_a["points"][2]["min_threshold"], line_a["points"][2]["max_threshold"]) == pytest.approx((0.5, 0.6))
    assert [p["rejected"] for p in line_a["points"]] == [0, 0, 1]
    assert (line_a["inspections"], line_a["anomalous"], line_a["rejected"]) == (9, 3, 1)
    assert groups["cam4"]["inspections"] == 0 and groups["cam4"]["points"][0]["rejected"] == 1
    assert data["total"] == {"inspections": 12, "anomalous": 4, "anomalous_rate": 4 / 12, "rejected": 2}
    # the same totals as /api/stats over the same window
    stats = env.client.get("/api/stats", params={"before": NOW.isoformat()}, headers=auth("viewer")).json()
    assert stats["total"] == data["total"]


def test_scores_per_source_with_thresholds(env):
    data = get(env, by="source", bucket=900, after=(NOW - 3 * HOUR).isoformat())
    groups = {group["key"]: group for group in data["groups"]}
    cam1 = groups["cam1"]
    assert [p["t"][11:16] for p in cam1["points"]] == ["09:00", "09:15", "09:45", "11:00", "11:45"]
    assert [p["max_score"] for p in cam1["points"]] == pytest.approx([0.20, 0.81, 0.30, 0.40, 0.91])
    # calibrated for (cam1, v1) → in effect; cam2 has none and no config: the threshold it last applied
    assert (cam1["threshold"], cam1["pixel_threshold"], cam1["calibrated"], cam1["model_version"]) == (
        0.65, 0.7, True, "v1")
    assert (groups["cam2"]["threshold"], groups["cam2"]["calibrated"]) == (0.5, False)
    assert groups["cam3"]["threshold"] == 0.45
    # a window that excludes the 11:xx rows
    early = get(env, by="source", bucket=900, after=(NOW - 3 * HOUR).isoformat(), before=(NOW - HOUR).isoformat())
    assert sum(g["inspections"] for g in early["groups"]) == 6  # with the error row


def test_bounds_and_errors(env):
    client = env.client
    assert client.get("/api/stats/series").status_code == 401
    week = {"after": (NOW - timedelta(days=7)).isoformat(), "before": NOW.isoformat()}
    assert client.get("/api/stats/series", params={**week, "bucket": 3600}, headers=auth("viewer")).json()[
        "total"]["inspections"] == 13
    too_many = client.get("/api/stats/series", params={**week, "bucket": 60}, headers=auth("viewer"))
    assert too_many.status_code == 400 and "more than 2000 buckets" in too_many.text
    assert client.get("/api/stats/series", params={"bucket": 10}, headers=auth("viewer")).status_code == 422
    assert client.get("/api/stats/series", params={"by": "model"}, headers=auth("viewer")).status_code == 422
    backwards = client.get("/api/stats/series", params={"after": NOW.isoformat(), "before": (NOW - HOUR).isoformat()},
                           headers=auth("viewer"))
    assert backwards.status_code == 400 and "earlier" in backwards.text


def test_rows_are_bounded(env, monkeypatch):
    monkeypatch.setattr(history, "MAX_SERIES_ROWS", 2)
    data = get(env, by="source", bucket=900)
    assert data["truncated"] is True
    assert sum(len(group["points"]) for group in data["groups"]) <= 2 + 2  # + the rejected frames' buckets


def test_cli_stats_shares_the_query(tmp_path, capsys):
    """`anomalyd stats` prints the same series as the API (one query, adapters.db.history.series), without torch."""
    import json
    import os
    import subprocess
    import sys

    from daemon.cli import main

    environment = Env(f"sqlite:///{tmp_path}/cli.db", tmp_path)
    with environment.sessions() as session, session.begin():
        for i, (source, line, minutes, score, threshold, anomalous) in enumerate(ROWS):
            session.add(Inspection(frame_id=f"s{i}", source=source, line=line,
                                   captured_at=NOW - timedelta(minutes=minutes, seconds=0.4), model_version="v1",
                                   score=score, threshold=threshold, is_anomalous=anomalous))
    api = get(environment)
    environment.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/cli.db"\n[storage]\ndir = "{tmp_path}/artifacts"\n')
    assert main(["stats", "--config", str(config), "--until", NOW.isoformat(), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == api
    assert main(["stats", "--config", str(config), "--until", NOW.isoformat(), "--by", "source",
                 "--bucket", "15m"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["source", "bucket", "(UTC)", "inspected"]
    assert "cam1    2026-06-03 11:45  1          1          100.0%  0.910       0.910      0" in table
    assert table[-1].startswith("total 2026-06-02T12:00:00 – 2026-06-03T12:00:00 UTC: 11 inspected, 4 anomalous")
    with pytest.raises(SystemExit) as usage:
        main(["stats", "--config", str(config), "--bucket", "soon"])
    assert usage.value.code == 2
    probe = ("import sys; from daemon.cli import main; code = main(sys.argv[1:]); "
             "print('HEAVY', sorted(m for m in ('torch', 'open_clip', 'cv2') if m in sys.modules)); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", probe, "stats", "--config", str(config)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert result.returncode == 0 and "HEAVY []" in result.stdout, result.stdout + result.stderr
