"""`GET /v1/models` and `GET /v1/models/{id}`: each served model with its version and content digest."""

from typing import Any

from fastapi import APIRouter, Request

from server.engine.types import ModelInfo

router = APIRouter()


def _card(info: ModelInfo) -> dict[str, Any]:
    return {
        "id": info.name,
        "object": "model",
        "created": info.created,
        "owned_by": "server",
        "version": info.version,
        "digest": f"sha256:{info.digest}",
        "fingerprint": info.fingerprint,
        "max_model_len": info.max_model_len,
        "pool": info.pool,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_card(info) for info in request.app.state.hub.models()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    hub = request.app.state.hub
    for info in hub.models():
        if info.name == model_id:
            return _card(info)
    hub.get(model_id)  # raises the 404 in OpenAI's shape
    raise AssertionError("unreachable")
