"""Pool gauges for /metrics: each pool's admission state and its devices' telemetry, read when Prometheus scrapes.

Nothing runs between scrapes. The admission snapshot is taken on the event loop (the gates are only
consistent there); the device reads (NVML on GPU pools, /proc on CPU pools) run in a worker thread so a
slow driver never stalls requests. A scrape waits at most `timeout_seconds` for them and then answers
without device gauges; while a read is still stuck no second one starts, so a hung driver holds one
worker thread, not one per scrape. A figure a device does not report is left out, never exported as 0.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from server.engine.telemetry import DeviceStats, pool_devices
from server.settings import PoolSettings

log = logging.getLogger(__name__)

POOL_STATES = ("serving", "draining", "isolated")
_DEVICE_LABELS = ["pool", "device", "kind", "name"]
# (metric suffix, help, DeviceStats field, divisor to the exported unit)
_DEVICE_GAUGES = (
    ("utilization_ratio", "Device utilization, 0 to 1 (CPU pools: 1-minute load per core)", "utilization_pct", 100),
    ("memory_used_bytes", "Device memory in use", "memory_used_bytes", 1),
    ("memory_total_bytes", "Device memory in total", "memory_total_bytes", 1),
    ("temperature_celsius", "GPU temperature", "temperature_c", 1),
    ("power_watts", "GPU power draw", "power_w", 1),
    ("ecc_errors", "Uncorrected ECC errors since the driver loaded", "ecc_errors_total", 1),
    ("retired_pages", "Memory pages retired for ECC errors (pre-Hopper GPUs)", "retired_pages", 1),
    ("remapped_rows", "Memory rows remapped for ECC errors (Hopper and later)", "remapped_rows", 1),
)


@dataclass(frozen=True)
class PoolReading:
    """One pool at one scrape: operator state, admission gate snapshot, device figures."""

    name: str
    state: str  # serving | draining | isolated
    admission: Mapping[str, Any]
    devices: Sequence[DeviceStats]


def _read_devices(pools: Sequence[PoolSettings]) -> dict[str, list[DeviceStats]]:
    return {pool.name: pool_devices(pool.device, pool.devices) for pool in pools}


class PoolTelemetry:
    """Reads pools for one scrape; at most one device read in flight per app."""

    def __init__(self, timeout_seconds: float = 2.0) -> None:
        self.timeout_seconds = timeout_seconds
        self._pending: asyncio.Future[dict[str, list[DeviceStats]]] | None = None

    async def read(
        self, pools: Sequence[PoolSettings], admission: Mapping[str, Mapping[str, Any]], states: Mapping[str, str]
    ) -> list[PoolReading]:
        """`admission` and `states` must be snapshots taken on the event loop before this call."""
        devices = await self._devices(pools)
        return [
            PoolReading(
                pool.name, states.get(pool.name, "serving"), admission.get(pool.name, {}), devices.get(pool.name, [])
            )
            for pool in pools
        ]

    async def _devices(self, pools: Sequence[PoolSettings]) -> dict[str, list[DeviceStats]]:
        loop = asyncio.get_running_loop()
        pending = self._pending
        if pending is None or pending.done() or pending.get_loop() is not loop:
            pending = self._pending = asyncio.ensure_future(asyncio.to_thread(_read_devices, pools))
        try:
            return await asyncio.wait_for(asyncio.shield(pending), self.timeout_seconds)
        except TimeoutError:
            log.warning("device telemetry took over %gs; /metrics answers without device gauges", self.timeout_seconds)
        except Exception as exc:  # telemetry must never fail the scrape
            log.warning("device telemetry failed: %s", exc)
        return {}


class PoolCollector(Collector):
    """The gauges of one scrape's readings (`server_pool_*`, `server_device_*`)."""

    def __init__(self, readings: Sequence[PoolReading]) -> None:
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        yield from self._admission()
        yield from self._devices()

    def _admission(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "server_pool_state",
            "1 for the pool's operator state (serving, draining, isolated)",
            labels=["pool", "state"],
        )
        gauges = {
            "in_flight": GaugeMetricFamily("server_pool_in_flight", "Requests holding a pool slot", labels=["pool"]),
            "queued": GaugeMetricFamily("server_pool_queued", "Requests waiting for a pool slot", labels=["pool"]),
            "total_concurrency": GaugeMetricFamily(
                "server_pool_max_concurrency", "Pool slots on this replica", labels=["pool"]
            ),
            "queue_length": GaugeMetricFamily(
                "server_pool_queue_length", "Waiters the pool queue holds at most", labels=["pool"]
            ),
        }
        for reading in self._readings:
            for name in POOL_STATES:
                state.add_metric([reading.name, name], float(reading.state == name))
            for field, family in gauges.items():
                if field in reading.admission:
                    family.add_metric([reading.name], float(reading.admission[field]))
        yield state
        yield from gauges.values()

    def _devices(self) -> Iterator[Metric]:
        for suffix, text, field, divisor in _DEVICE_GAUGES:
            family = GaugeMetricFamily(f"server_device_{suffix}", text, labels=_DEVICE_LABELS)
            for reading in self._readings:
                for device in reading.devices:
                    value = getattr(device, field)
                    if value is not None:
                        index = "host" if device.index is None else str(device.index)
                        family.add_metric([reading.name, index, device.kind, device.name], float(value) / divisor)
            yield family


async def read_app_pools(state: Any) -> list[PoolReading]:
    """Every configured pool of the running app (`app.state`), as /metrics and /v1/admin/pools show them: gate
    snapshots and pool states taken now, on the event loop; device figures off it, time-bounded."""
    return await state.metrics.pools.read(
        state.settings.pools, state.gatekeeper.snapshot(), dict(state.pool_control.states)
    )
