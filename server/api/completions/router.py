"""Route for text completions; the handler lives on app.state."""

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.identity.authz import requires

router = APIRouter()


@router.post("/v1/completions", dependencies=[requires("inference")])
async def create_completion(request: Request) -> Response:
    return await request.app.state.completions.create(request)
