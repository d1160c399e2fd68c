"""The daemon's HTTP app (FastAPI): health, Prometheus metrics; other routers are added by `create_app`'s callers.

`create_app(state)` builds the app around an `AppState` (stored as `app.state.anomalyd`), which the
routers reach through the `get_state` dependency. `require_role("viewer"|"operator"|"admin")` is the Bearer-token
dependency (`[[api.tokens]]`): missing/unknown token → 401, insufficient role → 403.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from daemon.metrics import Metrics

ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}


@dataclass
class AppState:
    """What the HTTP layer may use. `readiness()` returns (ready, details)."""

    settings: Any  # daemon.config.Settings
    metrics: Metrics
    readiness: Callable[[], tuple[bool, dict[str, Any]]]
    sessions: Any = None  # sqlalchemy sessionmaker
    store: Any = None  # adapters.storage.ArtifactStore
    service: Any = None  # daemon.service.Service (pipeline, publisher, swap_detector)
    extra: dict[str, Any] = field(default_factory=dict)


def get_state(request: Request) -> AppState:
    return request.app.state.anomalyd


def _token_role(state: AppState, request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    tokens = getattr(getattr(state.settings, "api", None), "tokens", None) or []
    for token in tokens:
        if token.matches(presented.strip()):
            return token.name, token.role
    return None


def require_role(role: str) -> Callable[..., str]:
    """A dependency: the caller's token name, after checking its role is at least `role`."""
    needed = ROLE_RANK[role]

    def check(request: Request, state: AppState = Depends(get_state)) -> str:
        found = _token_role(state, request)
        if found is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or unknown bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        name, granted = found
        if ROLE_RANK.get(granted, -1) < needed:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"token {name!r} has role {granted}, needs {role}")
        return name

    return check


def _open_or_viewer(flag: str) -> Callable[..., None]:
    """Health/metrics are open unless `[api].<flag>` is true."""
    viewer = require_role("viewer")

    def check(request: Request, state: AppState = Depends(get_state)) -> None:
        if getattr(getattr(state.settings, "api", None), flag, False):
            viewer(request, state)

    return check


health_router = APIRouter(prefix="/api/health", tags=["health"])


@health_router.get("/live", dependencies=[Depends(_open_or_viewer("auth_health"))])
def live() -> dict[str, str]:
    return {"status": "live"}


@health_router.get("/ready", dependencies=[Depends(_open_or_viewer("auth_health"))])
def ready(state: AppState = Depends(get_state)) -> JSONResponse:
    ok, details = state.readiness()
    return JSONResponse({"status": "ready" if ok else "not ready", "details": details},
                        status_code=200 if ok else 503)


metrics_router = APIRouter(tags=["metrics"])


@metrics_router.get("/metrics", dependencies=[Depends(_open_or_viewer("auth_metrics"))])
def metrics(state: AppState = Depends(get_state)) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(state: AppState, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The FastAPI app: health and metrics, plus `routers` (the operator API, the UI)."""
    app = FastAPI(title="anomalyd", version="0.1.0", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.anomalyd = state
    app.include_router(health_router)
    app.include_router(metrics_router)
    for router in routers:
        app.include_router(router)
    return app
