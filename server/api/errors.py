"""Render every error as OpenAI's envelope, in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.streaming import ClientGone
from server.errors import ServerError, error_body

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    404: ("not_found", "The requested URL was not found. Check the path (e.g. /v1/chat/completions)."),
    405: ("method_not_allowed", "This method is not allowed on this path."),
}


def _respond(request: Request, status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    error = body["error"]
    request.app.state.metrics.errors.labels(error["type"], error["code"] or "").inc()
    return JSONResponse(body, status_code=status, headers=headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServerError)
    if exc.status_code >= 500:
        log.error("request failed: %s", exc.message, exc_info=exc.__cause__)
    return _respond(request, exc.status_code, exc.body(), exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code, message = _HTTP_TYPES.get(exc.status_code, ("http_error", str(exc.detail)))
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _respond(request, exc.status_code, error_body(message, kind, code=code), dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return _respond(
        request,
        400,
        error_body(
            f"Invalid request: {first.get('msg', 'invalid')}.",
            "invalid_request_error",
            param=param,
            code="invalid_value",
        ),
    )


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _respond(
        request,
        500,
        error_body(
            "The server had an error while processing your request. Retry; if it persists, contact the operator.",
            "server_error",
            code="internal_error",
        ),
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServerError, _server_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
