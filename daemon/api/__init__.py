"""The operator HTTP API: inspections history, artifacts, labels, models, retraining, stats, live events.

`routers()` returns the FastAPI routers that `daemon.api.app.create_app` mounts (`anomalyd run` passes them to the
Service). The queries behind them live in `adapters.db.history`, shared with the operator CLI, which is why this
package imports FastAPI only inside `routers()`.
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
