"""`/api/models` (viewer): model versions with their metrics; activation and retraining (admin).

Activation and retraining are the retraining component's (`daemon.models.activate_version`,
`daemon.retraining.request_retrain`); this module only exposes them over HTTP.
"""

from __future__ import annotations

import importlib
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from adapters.db import ModelVersion
from daemon.api import history
from daemon.api.inspections import sessions_of
from daemon.app import AppState, get_state, require_role

router = APIRouter(prefix="/api", tags=["models"])


def _optional(module_name: str, attribute: str) -> Any:
    """A function of another component, or 501 when this build does not have it."""
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
    except AttributeError:
        pass
    raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, f"{module_name}.{attribute} is not available in this build")


def _unknown(exc: BaseException) -> bool:
    """An unknown version (404) rather than one that cannot be activated (409)."""
    return isinstance(exc, LookupError) or type(exc).__name__ == "UnknownVersionError"


@router.get("/models", summary="Model versions (newest first) with their metrics and status")
def list_models(state: AppState = Depends(get_state), _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    with sessions_of(state)() as session:
        return {"items": [history.model_dict(row) for row in history.list_models(session)], "next_cursor": None}


@router.post("/models/{version}/activate", summary="Make a model version the active one (admin)")
async def activate(version: str, state: AppState = Depends(get_state),
                   _: str = Depends(require_role("admin"))) -> JSONResponse:
    activate_version = _optional("daemon.models", "activate_version")
    try:
        result = await run_in_threadpool(activate_version, sessions_of(state), version)
    except (LookupError, ValueError) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND if _unknown(exc) else status.HTTP_409_CONFLICT,
                            str(exc).strip("'\"")) from None
    if isinstance(result, ModelVersion):
        return JSONResponse(history.model_dict(result))
    return JSONResponse({"version": version, "status": "active", "result": jsonable_encoder(result)})


@router.post("/retrain", status_code=status.HTTP_202_ACCEPTED, summary="Ask for a retraining run now (admin)")
async def retrain(state: AppState = Depends(get_state), _: str = Depends(require_role("admin"))) -> JSONResponse:
    request_retrain = _optional("daemon.retraining", "request_retrain")
    try:
        result = await run_in_threadpool(request_retrain, state)
    except Exception as exc:
        if any(cls.__name__ == "RetrainBusyError" for cls in type(exc).__mro__):  # a run is in progress
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        raise
    body = result if isinstance(result, dict) else {"result": result}
    return JSONResponse(jsonable_encoder(body), status_code=202)
