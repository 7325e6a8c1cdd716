"""In-flight request accounting shared by engine implementations (the source of queue-depth metrics)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from server.engine.types import EngineStats


class _Tracked:
    def __init__(self, counter: RequestCounter) -> None:
        self._counter = counter
        self.has_started = False

    def started(self) -> None:
        """The engine produced its first output for this request: it left the queue."""
        if not self.has_started:
            self.has_started = True
            self._counter.waiting -= 1
            self._counter.running += 1


class RequestCounter:
    """Counts requests waiting for their first output and requests producing output."""

    def __init__(self) -> None:
        self.waiting = 0
        self.running = 0
        self.aborted = 0

    @contextmanager
    def track(self) -> Iterator[_Tracked]:
        tracked = _Tracked(self)
        self.waiting += 1
        try:
            yield tracked
        finally:
            if tracked.has_started:
                self.running -= 1
            else:
                self.waiting -= 1

    def stats(self) -> EngineStats:
        return EngineStats(running=self.running, waiting=self.waiting, aborted=self.aborted)
