"""Admission errors, rendered by the app's one error handler like every other `ServerError`.

    ServerError
    ├── RateLimited (429, code=rate_limit_exceeded | insufficient_quota | concurrency_limit_exceeded)
    ├── LimiterUnavailable (503, code=limiter_unavailable: fails closed when limits cannot be checked)
    └── PoolBusy (429 code=key_concurrency_cap | 503 code=pool_saturated / queue_timeout / pool_draining …)

Failing closed is deliberate: a limiter that admits when its store is down turns a Redis outage into an
unmetered GPU pool for every caller at once.
"""

from __future__ import annotations

import math
from typing import Literal

from server.errors import ServerError

PoolBusyKind = Literal["key_cap", "saturated", "timeout", "draining", "isolated"]

_POOL_CODES: dict[str, tuple[int, str]] = {
    "key_cap": (429, "key_concurrency_cap"),
    "saturated": (503, "pool_saturated"),
    "timeout": (503, "queue_timeout"),
    "draining": (503, "pool_draining"),
    "isolated": (503, "pool_isolated"),
}


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """Retry-After is whole seconds; round up so a client that obeys it is never refused for being early."""
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class RateLimited(ServerError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"


class LimiterUnavailable(ServerError):
    """The limit store cannot be reached; the request is refused (503) rather than admitted unmetered."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "limiter_unavailable"

    def __init__(self, message: str = "rate limiter unavailable; retry shortly", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class PoolBusy(ServerError):
    """No slot on the GPU pool. `key_cap` is the caller's own concurrency (429); the rest are ours (503)."""

    error_type = "service_unavailable"

    def __init__(self, kind: PoolBusyKind, message: str, *, retry_after: float | None = None) -> None:
        status, code = _POOL_CODES[kind]
        super().__init__(message, code=code, headers=retry_after_header(retry_after))
        self.kind = kind
        self.retry_after = retry_after
        self.status_code = status
        if status == 429:
            self.error_type = "rate_limit_exceeded"
