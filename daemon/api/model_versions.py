"""`/api/models` (viewer): model versions with their metrics; activation and retraining (admin).

Activation and retraining are the version registry's (`daemon.learning.versions.VersionRegistry`) and the retrainer's
(`daemon.learning.head_retraining.request_retrain`: a patchcore-head for patchcore, the CLIP families' prompts otherwise);
this module only exposes them over HTTP. The listing carries the recent retraining runs too (daemon/learning/runs.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from adapters.db import history
from daemon.api.app import AppState, get_state, require_role
from daemon.api.inspections import sessions_of
from daemon.learning.head_retraining import refusal, request_retrain
from daemon.learning.retraining import RetrainBusyError
from daemon.learning.runs import recent_runs
from daemon.learning.versions import ModelVersionError, UnknownVersionError

router = APIRouter(prefix="/api", tags=["models"])


@router.get("/models", summary="Model versions (newest first) with their metrics and status")
def list_models(state: AppState = Depends(get_state), _: str = Depends(require_role("viewer"))) -> dict[str, Any]:
    """The versions, and the recent retraining runs (a failed run has no version: its reason is here)."""
    with sessions_of(state)() as session:
        return jsonable_encoder({"items": [history.model_dict(row) for row in history.list_versions(session)],
                                 "next_cursor": None,
                                 "runs": recent_runs(session)})


@router.post("/models/{version}/activate", summary="Make a model version the active one (admin)")
async def activate(version: str, state: AppState = Depends(get_state),
                   _: str = Depends(require_role("admin"))) -> JSONResponse:
    sessions_of(state)
    assert state.versions is not None  # made from the sessions
    try:
        result = await run_in_threadpool(state.versions.activate, version)
    except UnknownVersionError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except ModelVersionError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return JSONResponse(history.model_dict(result))


@router.post("/retrain", status_code=status.HTTP_202_ACCEPTED, summary="Ask for a retraining run now (admin)")
async def retrain(state: AppState = Depends(get_state), _: str = Depends(require_role("admin"))) -> JSONResponse:
    why = await run_in_threadpool(refusal, state.settings, sessions_of(state))
    if why is not None:  # refused up front, not a run that fails at once
        raise HTTPException(status.HTTP_409_CONFLICT, why)
    try:
        result = await run_in_threadpool(request_retrain, state)
    except RetrainBusyError as exc:  # a run is in progress
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return JSONResponse(jsonable_encoder(result), status_code=202)
