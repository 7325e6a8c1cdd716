"""Reading request bodies under a size cap (413 before the whole body is buffered)."""

from __future__ import annotations

from starlette.requests import Request

from server.errors import InvalidRequest, RequestTooLarge


async def read_body(request: Request, limit: int, *, allow_empty: bool = False) -> bytes:
    """The whole body, at most `limit` bytes; an empty body is a 400 unless `allow_empty` (then `{}`)."""
    too_large = RequestTooLarge(
        f"The request body is larger than this server's limit of {limit} bytes. Send a smaller request."
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("The Content-Length header is not a number.", code="invalid_header")
        if int(declared) > limit:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    if allow_empty and not body.strip():
        return b"{}"
    if size == 0:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    return body
