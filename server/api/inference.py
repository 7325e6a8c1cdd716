"""What the completion endpoints share: the engine lookup behind the caller's model allowlist."""

from __future__ import annotations

from starlette.requests import Request

from server.engine.hub import EngineHub
from server.engine.types import Engine
from server.errors import PermissionDenied
from server.identity.authn import principal_of
from server.observability.metrics import Metrics
from server.settings import LimitSettings


class InferenceService:
    def __init__(self, hub: EngineHub, limits: LimitSettings, metrics: Metrics) -> None:
        self.hub = hub
        self.limits = limits
        self.metrics = metrics

    def engine_for(self, request: Request, model: str) -> Engine:
        """The model's engine, if the caller's credential may use that model (403 before 404: an allowlisted
        key learns nothing about models outside its list)."""
        if not principal_of(request).may_use_model(model):
            raise PermissionDenied(
                f"This API key may not use the model {model!r}.", param="model", code="model_not_allowed"
            )
        return self.hub.get(model)
