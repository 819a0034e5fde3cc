"""Settings: the only module that reads the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.cpus import usable_cpus

GiB = 1024**3
MiB = 1024**2
DEV_SECRET = "dev-insecure-change-me"  # noqa: S105 - refused outside development


class Settings(BaseSettings):
    """Every knob of the platform; see the README table."""

    model_config = SettingsConfigDict(env_prefix="INFERATECH_", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    data_dir: Path = Path(".inferatech")
    database_url: str = ""
    redis_url: str = ""
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    public_base_url: str = "http://127.0.0.1:8000"

    secret_key: SecretStr = SecretStr(DEV_SECRET)
    key_pepper: SecretStr = SecretStr(DEV_SECRET)
    storage_events_secret: SecretStr = SecretStr(DEV_SECRET)

    operator_token: SecretStr | None = None
    signup_enabled: bool = True
    max_model_bytes: int = 8 * GiB
    max_files_per_model: int = 64
    max_file_path_length: int = 200
    multipart_threshold_bytes: int = 64 * MiB
    multipart_part_size: int = 64 * MiB
    upload_url_expiry_s: int = 3600
    validation_time_limit_s: int = 1800
    validation_max_pickle_bytes: int = 64 * MiB
    validation_smoke_test: bool = True
    # One pickle-based weights file's conversion to safetensors, in the sandbox (seconds).
    validation_convert_timeout_s: float = Field(default=600.0, gt=0)
    log_level: str = "INFO"
    # One JSON object a line (json) or plain lines (text); unset: text in development only.
    log_format: Literal["json", "text"] | None = None
    # Set: `GET /metrics` wants `Authorization: Bearer <token>`. Unset: it is open (keep it
    # off the public network); it never shows prompts, keys or accounts, only ids and counts.
    metrics_token: SecretStr | None = None

    # Execution layer
    execution_timeout_s: int = 600
    max_execution_timeout_s: int = 3600
    job_ttl_s: int = 24 * 3600
    # Chain-mode sessions: idle time before a conversation is forgotten (each turn renews it).
    session_ttl_s: int = Field(default=24 * 3600, ge=60, le=30 * 24 * 3600)
    session_max_context_tokens: int = Field(default=32_768, ge=1)
    max_prompt_chars: int = 200_000
    max_completion_tokens: int = 4096
    # Batches: requests per batch and the largest request body `POST /v1/batches` reads.
    batch_max_requests: int = Field(default=1000, ge=1)
    batch_max_body_bytes: int = Field(default=16 * MiB, ge=1024)
    max_embedding_inputs: int = Field(default=2048, ge=1)  # texts per embeddings request
    runner_idle_ttl_s: int = 300
    runner_max: int = 4
    runner_memory_budget_bytes: int = 16 * GiB
    # Engine threads per runner: the CPUs this process may use (affinity, cgroup quota; see
    # `core.cpus`) shared out among the runners a worker may hold.
    runner_threads: int = Field(default_factory=lambda: max(1, usable_cpus() // 4))
    runner_device: str = "auto"
    # CUDA hosts: the share of the GPUs' memory that runners may fill before the least
    # recently used idle one is torn down for a cold start (0: no GPU budget).
    runner_gpu_memory_fraction: float = Field(default=0.9, ge=0.0, le=1.0)
    # CUDA hosts: runners of one model at once (more time-slice the GPU: on an H100, four
    # runners of one GGUF served a quarter of the tokens one runner did at concurrency 4).
    runner_gpu_per_model: int = Field(default=1, ge=1, le=64)
    # CPU hosts: runners of one model at once; unset, as many as the usable CPUs hold at
    # `runner_threads` each (more only time-slice the same cores; see `PoolConfig`).
    runner_cpu_per_model: int | None = Field(default=None, ge=1, le=64)
    # Requests one GGUF runner decodes together (continuous batching, one llama.cpp context
    # with a KV stream each); other formats take one at a time. Off by default on both kinds
    # of host until the platform turns the engine's batching gain into throughput (see the
    # pool's `PoolConfig.gpu_batch`): CPU hosts run a busy model's runners side by side.
    runner_batch: int = Field(default=1, ge=1, le=64)
    runner_gpu_batch: int = Field(default=1, ge=1, le=64)
    # Blank runners kept spawned per worker (no model, no user data): cold starts skip
    # Python's start-up and engine imports. 0 spawns every runner on demand.
    runner_spares: int = Field(default=1, ge=0, le=8)
    weight_cache_dir: Path | None = None
    weight_cache_budget_bytes: int = 50 * GiB
    model_idle_delete_days: int = 7
    webhook_secret: SecretStr = SecretStr(DEV_SECRET)
    webhook_max_attempts: int = 8
    webhook_allow_private_hosts: bool = False
    visibility_margin_s: int = 600
    # API-key grants cached per API process; a revocation made elsewhere (another replica)
    # takes effect within this many seconds. 0 disables the cache.
    auth_cache_ttl_s: float = Field(default=10, ge=0, le=30)
    auth_cache_max_entries: int = Field(default=10_000, ge=1)
    # Per-key limits (0 = unlimited), enforced in Redis across API replicas. They are also the
    # ceiling an account may give a key it mints: owners tighten, operators raise.
    rate_limit_rpm: int = Field(default=1200, ge=0)
    rate_limit_tpm: int = Field(default=2_000_000, ge=0)
    rate_limit_concurrency: int = Field(default=64, ge=0)
    # Job and batch reads (GET, stream, cancel) per key or account token, per minute: a
    # polling loop gets 429 before it loads the database (0: off).
    rate_limit_read_rpm: int = Field(default=3000, ge=0)

    # Billing (Stripe). No API key: the ledger still records, the pusher idles.
    stripe_api_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_api_base: str = "https://api.stripe.com"
    stripe_meter_events_base: str | None = None  # v2 stream host; defaults to the API base
    stripe_timeout_s: float = 10.0
    stripe_meter_event_name: str = "tokens"
    # Both set: prompt and completion tokens go to two meters instead of one.
    stripe_input_meter_event_name: str | None = None
    stripe_output_meter_event_name: str | None = None
    stripe_meter_stream: bool = False  # v2 meter event stream (up to 100 events a request)
    billing_portal_return_url: str | None = None
    billing_push_interval_s: float = 5.0
    billing_push_batch: int = 500
    billing_claim_lease_s: int = 120
    billing_retry_max_s: int = 600
    # Prices per 1K tokens in USD: {"mdl_…": {"prompt": 0.1, "completion": 0.2}}.
    billing_model_prices: dict[str, dict[str, float]] = Field(default_factory=dict)
    # Default by size class (weights' bytes): small < 1 GiB ≤ medium < 8 GiB ≤ large.
    billing_class_prices: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "small": {"prompt": 0.02, "completion": 0.04},
            "medium": {"prompt": 0.1, "completion": 0.2},
            "large": {"prompt": 0.5, "completion": 1.0},
        }
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        """Resolved once, as the process starts: the paths derived from it are read on every
        request (each database session names the SQLite file), and `resolve()` costs a system
        call per path component; a later `chdir` then never moves the data either."""
        return value.resolve()

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Settings:
        if self.environment != "development":
            for name in ("secret_key", "key_pepper", "storage_events_secret", "webhook_secret"):
                value: SecretStr = getattr(self, name)
                if value.get_secret_value() == DEV_SECRET or len(value.get_secret_value()) < 16:
                    raise ValueError(
                        f"INFERATECH_{name.upper()} must be set to a random value "
                        "of at least 16 characters outside development"
                    )
        if self.multipart_part_size < 5 * MiB:
            raise ValueError("INFERATECH_MULTIPART_PART_SIZE must be at least 5 MiB (S3 minimum)")
        return self

    @property
    def stripe_configured(self) -> bool:
        return self.stripe_api_key is not None and bool(self.stripe_api_key.get_secret_value())

    @property
    def effective_log_format(self) -> Literal["json", "text"]:
        if self.log_format is not None:
            return self.log_format
        return "text" if self.environment == "development" else "json"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'inferatech.db'}"

    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or (self.data_dir / "objects").as_uri()

    @property
    def effective_weight_cache_dir(self) -> Path:
        return self.weight_cache_dir or self.data_dir / "cache"

    @property
    def effective_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "INFERATECH_REDIS_URL is not set: run `inferatech up` (embedded Redis) "
                "or point it at a Redis server"
            )
        return self.redis_url


class ClientEnv(BaseSettings):
    """The CLI client's own environment: which server to talk to, and as whom."""

    model_config = SettingsConfigDict(env_prefix="INFERATECH_", extra="ignore")

    api_url: str | None = None
    token: str | None = None
    operator_token: str | None = None  # operator commands (Stripe customer links)
    config: Path | None = None

    def credentials_path(self) -> Path:
        return self.config or Path.home() / ".config" / "inferatech" / "credentials.json"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests call `get_settings.cache_clear()` after patching env."""
    return Settings()
