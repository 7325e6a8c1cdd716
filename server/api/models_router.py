"""`GET /v1/models` and `GET /v1/models/{id}`: each served model with its version and content digest."""

from typing import Any

from fastapi import APIRouter, Request

from server.engine.types import ModelInfo
from server.identity.authn import principal_of
from server.identity.authz import requires

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


@router.get("/v1/models", dependencies=[requires("models:read")])
async def list_models(request: Request) -> dict[str, Any]:
    principal = principal_of(request)
    infos = [i for i in request.app.state.hub.models() if principal.may_use_model(i.name)]
    return {"object": "list", "data": [_card(info) for info in infos]}


@router.get("/v1/models/{model_id:path}", dependencies=[requires("models:read")])
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    hub = request.app.state.hub
    for info in hub.models():
        if info.name == model_id and principal_of(request).may_use_model(model_id):
            return _card(info)
    hub.get(model_id)  # raises the 404 in OpenAI's shape
    raise AssertionError("unreachable")
