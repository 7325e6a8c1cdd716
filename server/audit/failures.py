"""Failed authentications, counted in memory and written as a bounded number of audit rows.

Anyone can fail to authenticate, as fast as they can send requests, so one row per failure would let
unauthenticated traffic grow the database without limit (a bogus key with a 60 KB path, 300 times, was
18 MB). Instead each failure is tallied under (action, client address, TCP peer, reason); every interval the
tallies become one row each with the count, the first and last time, and a few truncated samples (paths,
emails). At most `max_rows` distinct tallies are kept per interval; failures from further sources share one
overflow row per action (`ACTIONS`: failed authentication of a request, failed login). So whatever arrives,
an interval adds at most `max_rows + len(ACTIONS)` rows of at most `MAX_ROW_BYTES` each.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from server.audit.service import Actor

FIELD_CHARS = 128  # any sampled value (path, email) is cut to this many characters
SAMPLES_PER_FIELD = 3
MAX_SAMPLE_FIELDS = 2
ADDR_CHARS = 64  # the audit table's address columns
REASON_CHARS = 40
# A generous bound on one aggregated row (columns and JSON details), checked by tests/unit/test_audit_bounds.py.
MAX_ROW_BYTES = 2048
OVERFLOW = "overflow"
# The actions whose failures are tallied; any other is recorded under "auth.failure".
ACTIONS = ("authn", "auth.login")

Key = tuple[str, str | None, str | None, str]


def truncate(value: Any, limit: int = FIELD_CHARS) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Tally:
    count: int
    first: datetime
    last: datetime
    samples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, now: datetime, samples: dict[str, Any]) -> None:
        self.count += 1
        self.last = now
        for name, value in samples.items():
            if value is None or (name not in self.samples and len(self.samples) >= MAX_SAMPLE_FIELDS):
                continue
            kept = self.samples.setdefault(truncate(name, 32), [])
            text = truncate(value)
            if len(kept) < SAMPLES_PER_FIELD and text not in kept:
                kept.append(text)


class FailureTally:
    """Thread-safe tallies of one interval; `drain` hands them over as audit rows and starts the next."""

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._tallies: dict[Key, _Tally] = {}

    def add(self, actor: Actor, action: str, reason: str, **samples: Any) -> None:
        now = datetime.now(UTC)
        action = action if action in ACTIONS else "auth.failure"
        key: Key = (
            action,
            _addr(actor.client_addr),
            _addr(actor.peer_addr),
            truncate(reason, REASON_CHARS),
        )
        with self._lock:
            tally = self._tallies.get(key)
            if tally is None:
                if len(self._tallies) >= self.max_rows:
                    key = (action, None, None, OVERFLOW)
                    tally = self._tallies.get(key)
                if tally is None:
                    tally = self._tallies[key] = _Tally(0, now, now)
            tally.add(now, samples)

    def pending(self) -> int:
        with self._lock:
            return len(self._tallies)

    def drain(self) -> list[dict[str, Any]]:
        """The interval's rows (AuditEvent columns), oldest first; the tallies start again from empty."""
        with self._lock:
            tallies, self._tallies = self._tallies, {}
        rows = []
        for (action, client, peer, reason), t in sorted(tallies.items(), key=lambda kv: kv[1].first):
            details: dict[str, Any] = {
                "reason": reason,
                "count": t.count,
                "first_at": t.first.isoformat(),
                "last_at": t.last.isoformat(),
                "aggregated": True,
                "samples": t.samples,
            }
            rows.append(
                {
                    "ts": t.last,
                    "org_id": None,
                    "actor_type": "anonymous",
                    "actor_id": None,
                    "action": action,
                    "outcome": "failure",
                    "target_type": None,
                    "target_id": None,
                    "client_addr": client,
                    "peer_addr": peer,
                    "request_id": None,
                    "details": details,
                }
            )
        return rows


def _addr(value: str | None) -> str | None:
    return None if value is None else truncate(str.__str__(value), ADDR_CHARS)
