"""The dtype an engine computes in: `auto` is float32 on CPU pools, the model's own dtype on CUDA pools."""

from __future__ import annotations

from server.engine.vllm_engine import engine_dtype
from server.settings import ModelSettings, PoolSettings, load_settings


def test_auto_is_float32_on_cpu_and_the_models_own_on_cuda() -> None:
    cpu, cuda = PoolSettings(name="cpu", device="cpu"), PoolSettings(name="gpu", device="cuda")
    assert ModelSettings().dtype == "auto"
    assert engine_dtype(cpu, ModelSettings()) == "float32"
    assert engine_dtype(cuda, ModelSettings()) == "auto"
    for explicit in ("bfloat16", "float16", "float32"):
        assert engine_dtype(cpu, ModelSettings(dtype=explicit)) == explicit
        assert engine_dtype(cuda, ModelSettings(dtype=explicit)) == explicit


def test_the_shipped_config_serves_float32_on_its_cpu_pool() -> None:
    settings = load_settings()
    model = settings.models[0]
    pool = next(p for p in settings.pools if p.name == model.pool)
    assert pool.device == "cpu" and engine_dtype(pool, model) == "float32"
