"""Route for chat completions; the handler lives on app.state."""

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.identity.authz import requires

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[requires("inference")])
async def create_chat_completion(request: Request) -> Response:
    return await request.app.state.chat.create(request)
