"""Pool telemetry: host figures without NVML, GPU figures where a driver answers."""

from __future__ import annotations

import pytest

from server.engine.telemetry import _Nvml, pool_devices


def test_cpu_pool_reports_host_figures():
    (host,) = pool_devices("cpu", [])
    assert host.kind == "cpu" and host.memory_total_bytes and host.memory_total_bytes > 0
    assert 0 <= host.memory_used_bytes <= host.memory_total_bytes
    assert host.utilization_pct is None or 0 <= host.utilization_pct <= 100


def test_cuda_pool_without_nvml_degrades_to_host_figures():
    if _Nvml.available():
        pytest.skip("this host has NVML; covered by the gpu test")
    (stats,) = pool_devices("cuda", [0])
    assert stats.kind == "cpu"


@pytest.mark.gpu
def test_gpu_figures_where_nvml_answers():
    if not _Nvml.available():
        pytest.skip("no NVIDIA driver on this host")
    (gpu,) = pool_devices("cuda", [0])
    assert gpu.kind == "gpu" and gpu.memory_total_bytes and gpu.name
    assert gpu.as_dict()["index"] == 0
