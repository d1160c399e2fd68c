"""The HTTP surface: the FastAPI app (health, metrics, the operator UI in daemon/static), its server thread, API
tokens, and the operator routers: inspections history, artifacts, labels, models, retraining, references and
calibration, thresholds, geometry, stats, live events.

Owns: app.py (`create_app`), server.py, tokens.py, guards.py (roles) and one module per router. `routers()` returns
the routers that `create_app` mounts (`anomalyd run` passes them to the Service); the queries behind them live in
`adapters.db.history`, shared with the operator CLI, which is why this package imports FastAPI only inside
`routers()`. May import: model, adapters, daemon.config, daemon.telemetry, daemon.detectors, daemon.zero_label,
daemon.references, daemon.learning.
"""

from __future__ import annotations

from typing import Any


def routers() -> list[Any]:
    """All operator API routers, in the order they are mounted."""
    from daemon.api.calibration_view import router as calibration_router
    from daemon.api.events import router as events_router
    from daemon.api.geometry import router as geometry_router
    from daemon.api.inspections import router as inspections_router
    from daemon.api.model_versions import router as models_router
    from daemon.api.references import router as references_router
    from daemon.api.stats import router as stats_router
    from daemon.api.thresholds import router as thresholds_router

    return [inspections_router, models_router, stats_router, events_router, references_router, thresholds_router,
            calibration_router, geometry_router]
