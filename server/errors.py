"""Typed errors raised by the domain and rendered in one place as OpenAI's error envelope.

    ServerError (500, server_error)
    ├── InvalidRequest (400, invalid_request_error)
    │   ├── UnknownField (400, code=unknown_field)
    │   ├── ContextLengthExceeded (400, code=context_length_exceeded)
    │   └── RequestTooLarge (413, code=request_too_large)
    ├── NotFound (404, invalid_request_error, code=model_not_found / not_found)
    ├── MethodNotAllowed (405)
    ├── EngineUnavailable (503, service_unavailable)
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
