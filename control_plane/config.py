"""Control-plane settings: one pydantic-settings class, `SLMOPS_` prefix, validated at start."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from slmops.mqtt.types import Protocol


class Settings(BaseSettings):
    """Everything the control plane reads from its environment.

    With no environment at all it runs on SQLite in `./.slmops` with an embedded MQTT broker.
    """

    model_config = SettingsConfigDict(env_prefix="SLMOPS_", env_file=None, extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path(".slmops")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default sqlite in the data dir. postgresql://... selects PostgreSQL.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    public_url: str | None = Field(default=None, description="URL devices use to reach this server.")
    max_upload_bytes: int = Field(default=8 * 1024**3, gt=0, description="Largest artifact accepted.")
    upload_chunk_bytes: int = Field(default=1024 * 1024, ge=4096)
    enrollment_token_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)
    mqtt_url: str | None = Field(default=None, description="External broker; default: embedded broker.")
    mqtt_host: str = Field(default="127.0.0.1", description="Bind address of the embedded broker.")
    # 1884, not 1883: a laptop or gateway often runs its own Mosquitto on the standard port.
    mqtt_port: int = Field(default=1884, ge=1, le=65535, description="Port of the embedded broker.")
    device_mqtt_url: str | None = Field(
        default=None, description="Broker URL handed to devices at enrollment."
    )
    mqtt_password_file: Path | None = Field(
        default=None, description="Mosquitto password file kept in step with enrolled devices."
    )
    mqtt_pid_file: Path | None = Field(default=None, description="Mosquitto pid file, signalled to reload.")
    fleet_enabled: bool = Field(
        default=True, description="Run the broker link, ingest and rollout controller."
    )
    controller_tick_s: float = Field(default=1.0, gt=0, le=60)
    telemetry_retention_s: int = Field(default=2 * 86400, ge=3600, description="Raw telemetry windows kept.")
    telemetry_minute_retention_s: int = Field(default=14 * 86400, ge=7200, description="Per-minute rollups kept.")
    telemetry_hour_retention_s: int = Field(default=400 * 86400, ge=7200, description="Per-hour rollups kept.")
    telemetry_rollup_interval_s: float = Field(default=30.0, gt=0, le=3600)
    mqtt_topic_prefix: str = "slmops/v1"
    # Each of the control plane's client ids is this label plus a tag derived from its broker
    # password (slmops.mqtt.credentials.client_id_for), so no device can name its session.
    mqtt_client_id: str = Field(default="slmops-control-plane", description="Stable id: the broker keeps its session.")
    # The control plane needs no MQTT 5 feature (a 3.1.1 session without clean_session persists
    # too), and paho builds a Properties object for every MQTT 5 PUBLISH and PUBACK it reads:
    # 17 us per message against 2 us for 3.1.1, on the one thread that ingests the whole fleet.
    mqtt_protocol: Protocol = Field(default="3.1.1", description="MQTT version of the control plane's connections.")
    # A secret, not a label: Mosquitto hands a shared message to a group member before it checks
    # that member may read it, so a device that joined the group would divert messages.
    mqtt_ingest_group: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{16,64}$",
        description="Shared-subscription group (16-64 random characters, e.g. `openssl rand -hex 16`): "
        "replicas in the group split device messages between them.",
    )
    # paho acknowledges a device message before ingest stores it: the journal keeps what is in
    # between on disk, so a crash of the control plane (kill -9 included) loses none of it.
    ingest_journal: bool = Field(
        default=True,
        description="Journal acknowledged device messages until stored (data_dir/ingest-journal/<client id>).",
    )
    # Names are compared as written, never resolved: see shared/references.py.
    artifact_reference_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Comma-separated hosts, addresses or CIDR networks that artifact references may "
        "name although loopback, link-local or private (e.g. a LAN mirror).",
    )
    release_key_file: Path | None = Field(
        default=None, description="Release signing key (slmops keys init); default: dev keys in data_dir/keys."
    )
    root_metadata_file: Path | None = Field(default=None, description="root.json: the chain of signed roots.")
    release_expiry_s: float = Field(default=7 * 86400, ge=1, description="Life of a signed release; re-signed at half.")
    log_json: bool = False
    log_level: str = Field(default="INFO", description="Level of the control plane's own log (stdout).")

    @field_validator("database_url")
    @classmethod
    def _normalise_database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        # psycopg 3 is the driver we ship; accept the bare scheme operators usually paste.
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        if not (value.startswith("postgresql+psycopg://") or value.startswith("sqlite")):
            raise ValueError("SLMOPS_DATABASE_URL must be a postgresql:// or sqlite:// URL")
        return value

    @field_validator("artifact_reference_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(h.strip() for h in value.split(",") if h.strip())
        return value

    @field_validator("mqtt_topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "#+"):
            raise ValueError("SLMOPS_MQTT_TOPIC_PREFIX must be a plain topic path like 'slmops/v1'")
        return value

    @model_validator(mode="after")
    def _production_needs_postgres(self) -> Settings:
        if self.environment == "production" and self.database_url is None:
            raise ValueError("SLMOPS_ENVIRONMENT=production requires SLMOPS_DATABASE_URL (PostgreSQL)")
        return self

    @cached_property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'slmops.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"
