"""Liveness, readiness and metrics endpoints."""

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (the engine may still be starting)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """200 only once every engine is up; 503 with the reason otherwise."""
    hub = request.app.state.hub
    models: list[dict[str, Any]] = [
        {"model": e.info.name, "version": e.info.version, "digest": f"sha256:{e.info.digest}", "ready": e.ready()}
        for e in hub.engines
    ]
    ready = hub.ready()
    body: dict[str, Any] = {"status": "ready" if ready else "starting", "models": models}
    if hub.start_error:
        body["status"], body["error"] = "failed", hub.start_error
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
