"""The daemon's HTTP app (FastAPI): health, Prometheus metrics; other routers are added by `create_app`'s callers.

`create_app(state)` builds the app around an `AppState` (stored as `app.state.anomalyd`), which the
routers reach through the `get_state` dependency. `require_role("viewer"|"operator"|"admin")` is the Bearer-token
dependency (`[[api.tokens]]`): missing/unknown token → 401, insufficient role → 403. Tokens are compared as
SHA-256 digests in constant time (`ApiToken.matches`), every configured token checked whatever matches first.

The operator UI (plain HTML/JS/CSS from `daemon/static/`, no build step) is served at `/`; the OpenAPI schema
at `/openapi.json` (also `/api/openapi.json`) with interactive docs at `/docs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Security, status
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.orm import Session, sessionmaker

from adapters.storage import ArtifactStore
from daemon.config.settings import Settings
from daemon.learning.versions import VersionRegistry
from daemon.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from adapters.sources.source import FrameSource
    from daemon.frames.worker import DetectorLike
    from daemon.learning.retraining import Retrainer
    from daemon.references.manager import ReferenceManager

ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# Declares the Bearer scheme in the OpenAPI schema (the docs' "Authorize" button); checking is ours (401, not 403).
_bearer = HTTPBearer(auto_error=False, description="a token from [[api.tokens]]")


@dataclass
class AppState:
    """What the HTTP layer may use. `readiness()` returns (ready, details).

    `versions` (the model-version registry) is made from `sessions` when not given; `retrainer` is the daemon's
    (an API without the daemon around it makes one on the first `POST /api/retrain`). `sources`, `references`
    and `current_detector()` are the running daemon's (empty / None in an API without the daemon around it).
    """

    settings: Settings
    metrics: Metrics
    readiness: Callable[[], tuple[bool, dict[str, Any]]]
    sessions: sessionmaker[Session] | None = None
    store: ArtifactStore | None = None
    retrainer: Retrainer | None = None
    versions: VersionRegistry | None = None
    sources: Sequence[FrameSource] = ()
    references: ReferenceManager | None = None
    current_detector: Callable[[], DetectorLike | None] = lambda: None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.versions is None and self.sessions is not None:
            self.versions = VersionRegistry(self.sessions)


def get_state(request: Request) -> AppState:
    return request.app.state.anomalyd


def _token_role(state: AppState, request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    tokens = list(getattr(getattr(state.settings, "api", None), "tokens", None) or [])
    tokens += _stored_tokens(state.settings)  # first-start admin token, `anomalyd tokens create`
    found = None
    for token in tokens:  # no early exit: the time taken does not tell which token matched
        if token.matches(presented.strip()) and found is None:
            found = token.name, token.role
    return found


def _stored_tokens(settings: Any) -> list[Any]:
    from daemon.api.tokens import stored_tokens

    return stored_tokens(settings)


def require_role(role: str) -> Callable[..., str]:
    """A dependency: the caller's token name, after checking its role is at least `role`."""
    needed = ROLE_RANK[role]

    def check(request: Request, state: AppState = Depends(get_state),
              _credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> str:
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


DOCS_ASSETS = "/docs/assets"


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from assets the daemon serves itself (the `swagger-ui-bundle` package), so the docs work
    on a line network without internet; FastAPI's default would load them from a CDN."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="anomalyd API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


def create_app(state: AppState, routers: Sequence[APIRouter] = (), *, ui: bool = True) -> FastAPI:
    """The FastAPI app: health and metrics, plus `routers` (the operator API) and, with `ui`, the web UI at `/`."""
    app = FastAPI(title="anomalyd", version="0.1.0", docs_url=None, openapi_url="/openapi.json",
                  description="Industrial inspection daemon: history, artifacts, labels, models. "
                              "Send `Authorization: Bearer <token>`; roles viewer < operator < admin.")
    app.state.anomalyd = state
    from daemon.api.guards import BodyLimit, SecurityHeaders

    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit)
    app.include_router(health_router)
    app.include_router(metrics_router)
    for router in routers:
        app.include_router(router)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi_alias() -> JSONResponse:
        return JSONResponse(app.openapi())

    _mount_docs(app)

    if ui and STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            # The page itself holds no data: everything it shows comes from the token-protected API.
            return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return app
