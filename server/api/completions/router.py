"""Route for text completions; the handler lives on app.state."""

from fastapi import APIRouter, Request
from starlette.responses import Response

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    return await request.app.state.completions.create(request)
