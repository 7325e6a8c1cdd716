"""Typed errors raised by the domain and rendered in one place as OpenAI's error envelope.

    ServerError (500, server_error)
    ├── InvalidRequest (400, invalid_request_error)
    │   ├── UnknownField (400, code=unknown_field)
    │   ├── ContextLengthExceeded (400, code=context_length_exceeded)
    │   └── RequestTooLarge (413, code=request_too_large)
    ├── Unauthenticated (401, code=invalid_api_key / invalid_token / missing_credentials …)
    │   └── StepUpRequired (401, code=mfa_step_up_required)
    ├── PermissionDenied (403, code=permission_denied / model_not_allowed)
    │   ├── GrantRefused (403, code=grant_exceeds_permissions / installation_permission): granting more than
    │   │   the caller holds, or an installation permission to an organization role
    │   └── InteractiveSessionRequired (403, code=interactive_session_required): changing authentication
    │       factors with an API key (or a token minted from one)
    ├── TooManyAttempts (429, code=too_many_attempts, Retry-After)
    ├── Conflict (409, code=conflict)
    ├── NotFound (404, invalid_request_error, code=model_not_found / not_found)
    ├── MethodNotAllowed (405)
    ├── EngineUnavailable (503, service_unavailable)
    ├── AuthUnavailable (503, code=auth_unavailable: fails closed when credentials cannot be checked)
    └── EngineFailure (500, server_error)

Every response body is {"error": {"message", "type", "param", "code"}}; messages say what was wrong and
what to do about it. Nothing from an exception's internals (paths, stack traces) reaches a client.
"""

from __future__ import annotations

from typing import Any


class ServerError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)


class InvalidRequest(ServerError):
    status_code = 400
    error_type = "invalid_request_error"


class UnknownField(InvalidRequest):
    default_code = "unknown_field"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class RequestTooLarge(InvalidRequest):
    status_code = 413
    default_code = "request_too_large"


class Unauthenticated(ServerError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="api"')


class StepUpRequired(Unauthenticated):
    default_code = "mfa_step_up_required"


class PermissionDenied(ServerError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class GrantRefused(PermissionDenied):
    default_code = "grant_exceeds_permissions"


class InteractiveSessionRequired(PermissionDenied):
    default_code = "interactive_session_required"


class TooManyAttempts(ServerError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    default_code = "too_many_attempts"


class Conflict(ServerError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class AuthUnavailable(ServerError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "auth_unavailable"


class NotFound(ServerError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(ServerError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class EngineUnavailable(ServerError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "engine_unavailable"


class EngineFailure(ServerError):
    default_code = "engine_error"


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
