"""Out-of-range API input gives 4xx, never 500 or a broken stream (issue 9, case 10), on SQLite and PostgreSQL;
the UI is served with CSP / frame-ancestors and X-Frame-Options (case 14)."""

from __future__ import annotations

import base64
import json

import pytest

from tests.daemon.test_api import auth, env  # noqa: F401 - the fixture (SQLite and PostgreSQL)


def cursor(payload: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


HUGE = 2**63


@pytest.mark.parametrize("path", [f"/api/inspections/{HUGE}", f"/api/inspections/{HUGE}/mask.png",
                                  f"/api/inspections/{2**70}", "/api/inspections/-9223372036854775809"])
def test_case10_ids_out_of_range_are_404(env, path):  # noqa: F811
    assert env.client.get(path, headers=auth("viewer")).status_code == 404


def test_case10_labelling_an_id_out_of_range_is_404(env):  # noqa: F811
    response = env.client.post(f"/api/inspections/{HUGE}/label", json={"label": "normal"}, headers=auth("operator"))
    assert response.status_code == 404


@pytest.mark.parametrize("payload", [
    {"s": "time_desc", "k": "2024-05-01T08:00:00+00:00", "i": 2**70},
    {"s": "time_desc", "k": "2024-05-01T08:00:00+00:00", "i": True},
    {"s": "time_desc", "k": "0001-01-01T00:00:00+14:00", "i": 1},
    {"s": "time_desc", "k": 12, "i": 1},
    {"s": "score_desc", "k": True, "i": 1},
    {"s": "score_desc", "k": 1e400, "i": 1},
])
def test_case10_bad_cursors_are_400(env, payload):  # noqa: F811
    env.add()
    sort = payload["s"]
    response = env.client.get("/api/inspections", params={"cursor": cursor(payload), "sort": sort},
                              headers=auth("viewer"))
    assert response.status_code == 400 and "invalid cursor" in response.json()["detail"], response.text


@pytest.mark.parametrize(("path", "params"), [
    *((path, params) for path in ("/api/inspections", "/api/stats")
      for params in ({"after": "0001-01-01T00:00:00+14:00"}, {"before": "9999-12-31T23:59:59-14:00"})),
    ("/api/stats", {"before": "0001-01-01T05:00:00Z"}),  # its default window would start before year 1
])
def test_case10_times_out_of_range_are_422(env, path, params):  # noqa: F811
    response = env.client.get(path, params=params, headers=auth("viewer"))
    assert response.status_code == 422, response.text


def test_case10_events_with_a_huge_after_id_are_refused_before_the_stream(env):  # noqa: F811
    response = env.client.get("/api/events", params={"after_id": HUGE, "max_events": 1}, headers=auth("viewer"))
    assert response.status_code == 422
    response = env.client.get("/api/events", params={"max_events": 1},
                              headers={**auth("viewer"), "Last-Event-ID": str(HUGE)})
    assert response.status_code == 400


def test_case14_ui_security_headers(env):  # noqa: F811
    page = env.client.get("/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    script = env.client.get("/static/app.js")
    assert script.headers["x-content-type-options"] == "nosniff" and "content-security-policy" in script.headers
    api = env.client.get("/api/inspections", headers=auth("viewer"))
    assert api.headers["x-frame-options"] == "DENY"
    # the daemon's state now: never stored by a browser or proxy
    assert api.headers["cache-control"] == "no-store"
