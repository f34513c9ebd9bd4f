"""The one settings object, read from ``KPI_*`` environment variables.

Built once at the entry point (``kpi worker`` and friends) and passed down; never a module global.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of every ``kpi`` command. Each field is the env var ``KPI_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="KPI_", frozen=True, extra="ignore")

    kafka_bootstrap: str = Field("localhost:9092", description="Kafka bootstrap servers, host:port")
    redis_url: str = Field("redis://localhost:6379/0", description="The shared Redis store")
    redis_prefix: str = Field("kpi", description="Prefix of every Redis key this project writes")
    events_topic: str = Field("kpi-events", description="Topic of the campaign events")
    dlq_topic: str = Field("kpi-events-dlq", description="Dead-letter topic of rejected events")
    events_partitions: int = Field(8, ge=1, description="Partitions when creating the topics")
    replication_factor: int = Field(1, ge=1, description="Replication when creating the topics")
    group_id: str = Field("kpi-stream", description="Consumer group (Faust app id) of the workers")
    identity_key: SecretStr = Field(
        SecretStr(""),
        description="HMAC key hashing participant identities (required by `kpi worker`)",
    )
    session_gap_seconds: int = Field(1800, ge=1, description="Idle gap that ends a visit")
    idle_advance_seconds: int = Field(
        60, ge=1, description="Quiet time after which a partition's watermark follows the clock"
    )
    allowed_lateness_seconds: int = Field(
        600, ge=0, description="How far behind the watermark an event may be and still count"
    )
    max_future_seconds: int = Field(
        300, ge=0, description="Events further ahead of the wall clock are rejected"
    )
    dedup_retention_seconds: int = Field(
        86400, ge=3600, description="Event time an event_id is remembered for deduplication"
    )
    hll_retention_seconds: int = Field(
        3 * 86400, ge=86400, description="Wall-clock lifetime of the window HyperLogLog buckets"
    )
    scrape_cache_max_age_seconds: float = Field(
        300.0,
        ge=0,
        description="Longest time a scrape reuses what it read before from the store (0: never)",
    )
    web_host: str = Field("127.0.0.1", description="Address of the /metrics web server")
    web_port: int = Field(6066, ge=0, le=65535, description="Port of the /metrics web server")
    # 0 by default: on live traffic a visitor's next event comes several steps later, past what
    # a cache of a few thousand holds, and holding them cost more than the fetches it saved
    # (docs/performance.md, tenth round); a backlog replay ran ~5 % faster with 10,000.
    visit_cache: int = Field(
        0,
        ge=0,
        description="Open visits a worker keeps in memory per partition between batches "
        "(the store holds them all; 0: fetch every batch's visits)",
    )
    batch_max_records: int = Field(2000, ge=1, description="Records handled per batch at most")
    batch_within_ms: int = Field(50, ge=1, description="Longest wait to fill a batch")
    batch_max_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Record bytes per batch at most (bounds memory)"
    )
    fetch_max_wait_ms: int = Field(
        100,
        ge=1,
        le=1500,
        description="Longest time the broker may hold a fetch waiting for data (Faust: 1500)",
    )
    broker_session_timeout_seconds: float = Field(
        10.0, gt=0, description="Kafka consumer-group session timeout"
    )
    log_level: str = Field("INFO", description="Log level of the worker")
    data_dir: str = Field(".kpi-data", description="Faust's local data directory")

    def identity_key_bytes(self) -> bytes:
        """The HMAC key as bytes (empty when unset)."""
        return self.identity_key.get_secret_value().encode()
