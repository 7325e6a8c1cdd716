"""Liveness, readiness and metrics endpoints."""

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from server.identity.authz import requires
from server.identity.rbac import PUBLIC
from server.observability.pools import read_app_pools

router = APIRouter()


@router.get("/healthz", dependencies=[requires(PUBLIC)])
async def healthz() -> dict[str, str]:
    """The process is alive (the engine may still be starting)."""
    return {"status": "ok"}


@router.get("/readyz", dependencies=[requires(PUBLIC)])
async def readyz(request: Request) -> Response:
    """200 only once every engine is up; 503 with the reason otherwise."""
    hub = request.app.state.hub
    models: list[dict[str, Any]] = [
        {"model": e.info.name, "version": e.info.version, "digest": f"sha256:{e.info.digest}", "ready": e.ready()}
        for e in hub.engines
    ]
    ready = hub.ready()
    body: dict[str, Any] = {"status": "ready" if ready else "starting", "models": models}
    if hub.swap_errors:  # the previous (verified) version keeps serving; the newly active one was refused
        body["swap_errors"] = dict(hub.swap_errors)
    if hub.start_error:
        body["status"], body["error"] = "failed", hub.start_error
    return JSONResponse(body, status_code=200 if ready else 503)


def metrics_router(public: bool) -> APIRouter:
    """/metrics needs `metrics:read` unless the operator made it public (then bind it privately)."""
    metrics_routes = APIRouter()

    @metrics_routes.get("/metrics", dependencies=[requires(PUBLIC if public else "metrics:read")])
    async def metrics(request: Request) -> Response:
        state = request.app.state
        pools = await read_app_pools(state)
        return Response(state.metrics.render(pools), media_type="text/plain; version=0.0.4; charset=utf-8")

    return metrics_routes
