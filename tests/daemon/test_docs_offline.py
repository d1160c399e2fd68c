"""`/docs` works without internet: the Swagger UI page refers only to assets the daemon serves itself."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from daemon.api import routers
from daemon.api.app import AppState, create_app
from daemon.config.settings import load_config
from daemon.telemetry.metrics import Metrics


def test_docs_page_loads_only_local_assets():
    state = AppState(settings=load_config(None, environ={}), metrics=Metrics(), readiness=lambda: (True, {}))
    client = TestClient(create_app(state, routers()))
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page.text)
    urls += re.findall(r"""url:\s*["']([^"']+)["']""", page.text)
    assert urls and not [url for url in urls if "://" in url or url.startswith("//")], urls
    kinds = {}
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        kinds[url.rsplit(".", 1)[-1]] = response
    assert "SwaggerUIBundle" in kinds["js"].text and len(kinds["js"].content) > 100_000
    assert ".swagger-ui" in kinds["css"].text
    assert "/api/inspections" in kinds["json"].json()["paths"]
