"""Pool admission state and device telemetry in /metrics, read at scrape time (host figures without NVML)."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client.parser import text_string_to_metric_families

from server.audit.service import Actor
from server.engine.telemetry import DeviceStats
from server.observability import pools as pool_metrics
from server.observability.pools import PoolCollector, PoolReading, PoolTelemetry
from server.settings import PoolSettings


def scrape(client) -> dict[tuple[str, frozenset], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(resp.text)
        for sample in family.samples
    }


def pool_sample(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset({"pool": "cpu", **labels}.items())))


def device_samples(samples, name: str) -> list[tuple[dict, float]]:
    return [(dict(labels), value) for (n, labels), value in samples.items() if n == name]


def test_metrics_export_the_cpu_pool_gauges(client):
    samples = scrape(client)
    pool = client.app.state.settings.pool("cpu")
    assert pool_sample(samples, "server_pool_state", state="serving") == 1
    assert pool_sample(samples, "server_pool_state", state="draining") == 0
    assert pool_sample(samples, "server_pool_state", state="isolated") == 0
    assert pool_sample(samples, "server_pool_in_flight") == 0 and pool_sample(samples, "server_pool_queued") == 0
    assert pool_sample(samples, "server_pool_max_concurrency") == pool.max_concurrency
    assert pool_sample(samples, "server_pool_queue_length") == pool.queue_length

    (total_labels, total), *_ = device_samples(samples, "server_device_memory_total_bytes")
    assert total_labels["pool"] == "cpu" and total_labels["device"] == "host" and total_labels["kind"] == "cpu"
    (_, used), *_ = device_samples(samples, "server_device_memory_used_bytes")
    assert total > 0 and 0 <= used <= total
    for _, utilization in device_samples(samples, "server_device_utilization_ratio"):
        assert 0 <= utilization <= 1
    assert device_samples(samples, "server_device_temperature_celsius") == []  # not reported: left out, never 0


def test_metrics_follow_pool_state_and_slots(client):
    app = client.app
    gate = app.state.gatekeeper.admitter.gates["cpu"]
    ticket = client.portal.call(gate.acquire, "some-key")
    try:
        assert pool_sample(scrape(client), "server_pool_in_flight") == 1
    finally:
        client.portal.call(gate.release, ticket)
    app.state.pool_control.set_state("cpu", "isolated", Actor.system(), "test")
    samples = scrape(client)
    assert pool_sample(samples, "server_pool_state", state="isolated") == 1
    assert pool_sample(samples, "server_pool_state", state="serving") == 0
    assert pool_sample(samples, "server_pool_in_flight") == 0


def test_gpu_figures_are_exported_and_missing_ones_left_out():
    gpu = DeviceStats(
        index=1,
        name="H100",
        kind="gpu",
        utilization_pct=42.0,
        memory_used_bytes=10,
        memory_total_bytes=80,
        temperature_c=55.0,
        power_w=300.5,
        ecc_errors_total=0,
        remapped_rows=2,
    )
    reading = PoolReading("gpu", "draining", {"in_flight": 3, "queued": 1}, [gpu])
    families = {f.name: f for f in PoolCollector([reading]).collect()}
    labels = {"pool": "gpu", "device": "1", "kind": "gpu", "name": "H100"}

    def value(name: str) -> float | None:
        return next((s.value for s in families[name].samples if s.labels == labels), None)

    assert value("server_device_utilization_ratio") == 0.42
    assert value("server_device_temperature_celsius") == 55.0 and value("server_device_power_watts") == 300.5
    assert value("server_device_ecc_errors") == 0 and value("server_device_remapped_rows") == 2
    assert families["server_device_retired_pages"].samples == []
    state = {s.labels["state"]: s.value for s in families["server_pool_state"].samples}
    assert state == {"serving": 0, "draining": 1, "isolated": 0}
    assert families["server_pool_max_concurrency"].samples == []  # not in this snapshot: not exported


def test_a_stuck_device_read_never_holds_up_the_scrape(monkeypatch):
    release, calls = threading.Event(), []

    def stuck(device: str, indices: list[int]) -> list[DeviceStats]:
        calls.append(device)
        release.wait(10)
        return []

    monkeypatch.setattr(pool_metrics, "pool_devices", stuck)
    telemetry = PoolTelemetry(timeout_seconds=0.05)
    pool = PoolSettings()

    async def scrape_twice() -> tuple[list[PoolReading], list[PoolReading]]:
        try:
            return await telemetry.read([pool], {}, {}), await telemetry.read([pool], {"cpu": {"queued": 2}}, {})
        finally:
            release.set()

    first, second = asyncio.run(scrape_twice())
    assert first[0].devices == [] and first[0].state == "serving"
    assert second[0].admission == {"queued": 2}
    assert calls == ["cpu"]  # the second scrape waited on the same read instead of starting another
