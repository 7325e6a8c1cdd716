"""Device telemetry for pools: NVIDIA GPUs through nvidia-ml-py (imported here only), host figures otherwise.

Every field is optional: cards differ in what NVML answers (Hopper reports remapped rows, not retired
pages), and CPU hosts have no NVML at all. Nothing here raises to the caller.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceStats:
    index: int | None
    name: str
    kind: str  # "gpu" | "cpu"
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    ecc_errors_total: int | None = None
    retired_pages: int | None = None
    remapped_rows: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Nvml:
    """Lazy, process-wide NVML session; `available` is False where the library or a driver is missing."""

    _lock = threading.Lock()
    _state: bool | None = None

    @classmethod
    def available(cls) -> bool:
        with cls._lock:
            if cls._state is None:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    cls._state = True
                except Exception as exc:  # no library, no driver, no device
                    log.info("NVML unavailable (%s); pools report host figures", type(exc).__name__)
                    cls._state = False
            return cls._state


def _field(read: Any, *args: Any) -> Any:
    try:
        return read(*args)
    except Exception:  # NVMLError_NotSupported and friends: the card does not report it
        return None


def gpu_stats(index: int) -> DeviceStats:
    import pynvml

    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = _field(pynvml.nvmlDeviceGetName, handle) or f"gpu{index}"
    util = _field(pynvml.nvmlDeviceGetUtilizationRates, handle)
    mem = _field(pynvml.nvmlDeviceGetMemoryInfo, handle)
    temp = _field(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
    power = _field(pynvml.nvmlDeviceGetPowerUsage, handle)
    ecc = _field(
        pynvml.nvmlDeviceGetTotalEccErrors, handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
    )
    pages = [
        _field(pynvml.nvmlDeviceGetRetiredPages, handle, cause)
        for cause in (
            pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
            pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
        )
    ]
    remapped = _field(pynvml.nvmlDeviceGetRemappedRows, handle)
    return DeviceStats(
        index=index,
        name=name.decode() if isinstance(name, bytes) else str(name),
        kind="gpu",
        utilization_pct=float(util.gpu) if util is not None else None,
        memory_used_bytes=int(mem.used) if mem is not None else None,
        memory_total_bytes=int(mem.total) if mem is not None else None,
        temperature_c=float(temp) if temp is not None else None,
        power_w=power / 1000.0 if power is not None else None,
        ecc_errors_total=int(ecc) if ecc is not None else None,
        retired_pages=sum(len(p) for p in pages) if all(p is not None for p in pages) else None,
        remapped_rows=int(remapped[0] + remapped[1]) if remapped is not None else None,
    )


def host_stats() -> DeviceStats:
    """The CPU pool: load as a utilization estimate, memory from /proc/meminfo."""
    total = available = None
    try:
        text = Path("/proc/meminfo").read_text()
        info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        load = os.getloadavg()[0]
        util = min(100.0, 100.0 * load / (os.cpu_count() or 1))
    except OSError:
        util = None
    return DeviceStats(
        index=None,
        name=f"host ({os.cpu_count()} CPUs)",
        kind="cpu",
        utilization_pct=util,
        memory_used_bytes=total - available if total is not None and available is not None else None,
        memory_total_bytes=total,
    )


def pool_devices(device: str, indices: list[int]) -> list[DeviceStats]:
    if device == "cuda" and _Nvml.available():
        out = []
        for index in indices or [0]:
            try:
                out.append(gpu_stats(index))
            except Exception as exc:
                log.warning("NVML could not read GPU %d: %s", index, exc)
                out.append(DeviceStats(index=index, name=f"gpu{index} (unreadable)", kind="gpu"))
        return out
    return [host_stats()]
