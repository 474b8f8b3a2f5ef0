"""Control-plane settings: one pydantic-settings class, `SLMOPS_` prefix, validated at start."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.mqtt.errors import BrokerURLError
from shared.mqtt.types import Protocol
from shared.mqtt.url import parse_broker_urls


class Settings(BaseSettings):
    """Everything the control plane reads from its environment.

    With no environment at all it runs on SQLite in `./.slmops` with an embedded MQTT broker.
    """

    model_config = SettingsConfigDict(env_prefix="SLMOPS_", env_file=None, extra="ignore")

    environment: Literal["development", "production"] = Field(
        default="development",
        description="`production` refuses to start without PostgreSQL and with the development keys.",
    )
    data_dir: Path = Field(
        default=Path(".slmops"),
        description="SQLite database, the blob store (`blobs/sha256/<hex>`), dev keys and the ingest journal.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default sqlite in the data dir. postgresql://... selects PostgreSQL.",
    )
    host: str = Field(default="127.0.0.1", description="Listen address of the API and dashboard.")
    port: int = Field(default=8080, ge=1, le=65535, description="Listen port of the API and dashboard.")
    public_url: str | None = Field(default=None, description="URL devices use to reach this server.")
    max_upload_bytes: int = Field(default=8 * 1024**3, gt=0, description="Largest artifact accepted.")
    upload_chunk_bytes: int = Field(default=1024 * 1024, ge=4096, description="Size of each read of a streamed upload.")
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest body of any request but an artifact upload."
    )
    rate_limit_auth_failures_per_min: int = Field(
        default=60, ge=0, description="Failed bearer/Basic checks per client address a minute (0: no limit)."
    )
    rate_limit_enroll_failures_per_min: int = Field(
        default=30, ge=0, description="Refused enrollments per client address a minute (0: no limit)."
    )
    rate_limit_login_failures_per_min: int = Field(
        default=10, ge=0, description="Refused dashboard sign-ins per client address a minute (0: no limit)."
    )
    dashboard_session_ttl_s: int = Field(default=12 * 3600, ge=60, description="Dashboard sign-in lifetime.")
    enrollment_token_ttl_s: int = Field(
        default=7 * 24 * 3600, gt=0, description="Lifetime of a one-time enrollment token."
    )
    idempotency_ttl_s: int = Field(
        default=24 * 3600, gt=0, description="How long an `Idempotency-Key` and its response are remembered."
    )
    blob_gc_grace_s: float = Field(
        default=600, ge=0, description="Unreferenced blobs younger than this are kept (uploads adopt before commit)."
    )
    mqtt_url: str | None = Field(
        default=None,
        description="External broker; default: embedded broker. A cluster: its nodes' URLs, comma-separated.",
    )
    mqtt_host: str = Field(default="127.0.0.1", description="Bind address of the embedded broker.")
    # 1884, not 1883: a laptop or gateway often runs its own Mosquitto on the standard port.
    mqtt_port: int = Field(default=1884, ge=1, le=65535, description="Port of the embedded broker.")
    device_mqtt_url: str | None = Field(
        default=None, description="Broker URL(s) handed to devices at enrollment (comma-separated for a cluster)."
    )
    mqtt_password_file: Path | None = Field(
        default=None, description="Mosquitto password file kept in step with enrolled devices."
    )
    mqtt_pid_file: Path | None = Field(default=None, description="Mosquitto pid file, signalled to reload.")
    nats_users_file: Path | None = Field(
        default=None, description="NATS users file (included by every node) kept in step with enrolled devices."
    )
    nats_pid_files: Annotated[tuple[Path, ...], NoDecode] = Field(
        default=(), description="Pid files (comma-separated) of the NATS nodes reading nats_users_file: reloaded."
    )
    mqtt_ca_file: Path | None = Field(default=None, description="PEM CAs verifying an mqtts:// broker.")
    fleet_enabled: bool = Field(default=True, description="Run the broker link, ingest and rollout controller.")
    controller_tick_s: float = Field(default=1.0, gt=0, le=60, description="Rollout controller period.")
    telemetry_retention_s: int = Field(default=2 * 86400, ge=3600, description="Raw telemetry windows kept.")
    telemetry_minute_retention_s: int = Field(default=14 * 86400, ge=7200, description="Per-minute rollups kept.")
    telemetry_hour_retention_s: int = Field(default=400 * 86400, ge=7200, description="Per-hour rollups kept.")
    telemetry_rollup_interval_s: float = Field(
        default=30.0, gt=0, le=3600, description="How often the rollup job runs (on the controller's leader)."
    )
    mqtt_topic_prefix: str = Field(
        default="slmops/v1",
        description="Topic namespace of every device topic (no leading or trailing `/`, no `#`/`+`).",
    )
    # Each of the control plane's client ids is this label plus a tag derived from its broker
    # password (control_plane.fleet.credentials.client_id_for), so no device can name its session.
    mqtt_client_id: str = Field(default="slmops-control-plane", description="Stable id: the broker keeps its session.")
    # 3.1.1 by default: the control plane needs no MQTT 5 feature, and paho parses MQTT 5
    # properties on every packet of the one thread that ingests the fleet (ADR 0002).
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
    # between on disk, so a crash of the control plane loses none of it (ADR 0003).
    ingest_journal: bool = Field(
        default=True,
        description="Journal acknowledged device messages until stored (data_dir/ingest-journal/<client id>).",
    )
    # One durable consumer shared by every replica splits the stream between them; a message is
    # acknowledged once stored, so a replica's crash loses none (control_plane/fleet/jetstream.py).
    ingest_source: Literal["mqtt", "jetstream"] = Field(
        default="mqtt",
        description="Where device messages are read: the broker's MQTT subscription or a NATS JetStream stream.",
    )
    ingest_nats_urls: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="Comma-separated nats:// URLs of the JetStream ingest (SLMOPS_INGEST_SOURCE=jetstream)."
    )
    ingest_stream: str = Field(
        default="SLMOPS_DEVICES", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="JetStream stream of device messages."
    )
    ingest_stream_replicas: int = Field(
        default=1, ge=1, le=5, description="Copies of the stream a NATS cluster keeps (3 on a three-node cluster)."
    )
    ingest_consumer: str = Field(
        default="slmops-ingest", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Durable consumer the replicas share."
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
    release_signing: bool = Field(
        default=True,
        description="Sign a release into every desired state. Off only to measure what signing costs "
        "(benchmarks/release_promote.py): devices with a root refuse unsigned states; refused in production.",
    )
    device_certificates: bool = Field(
        default=False, description="Sign an enrolling device's CSR: X.509 identities on the broker's mTLS listener."
    )
    device_ca_dir: Path | None = Field(default=None, description="Device CA files; default <data dir>/device-ca.")
    device_certificate_days: int = Field(
        default=90, ge=1, le=3650, description="Lifetime of a device certificate signed at enrollment."
    )
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate (chain): serve https.")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    hsts_max_age_s: int = Field(default=365 * 86400, ge=0, description="HSTS max-age on https responses; 0: none.")
    # uvicorn trusts X-Forwarded-For/-Proto only from these proxies ("*": any; see docs/operations-tls.md).
    forwarded_allow_ips: str = Field(default="127.0.0.1,::1", description="Reverse proxies trusted for X-Forwarded-*.")
    # Replicas share one store: with s3 an upload through one replica is downloadable through all,
    # and devices fetch the bytes from the store (a 307 to a presigned URL), not from a replica.
    blob_store: Literal["local", "s3"] = Field(
        default="local", description="Where artifact bytes live: `local` (data_dir/blobs) or `s3`."
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, Ceph...); unset: AWS S3. Credentials: AWS_* env."
    )
    s3_bucket: str | None = Field(default=None, description="Bucket of the artifacts (SLMOPS_BLOB_STORE=s3).")
    s3_presign_expiry_s: int = Field(
        default=900, ge=60, le=7 * 86400, description="Lifetime of the presigned download URLs devices are sent to."
    )
    log_json: bool = Field(default=False, description="Log one JSON object per line instead of plain text.")
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

    @field_validator("artifact_reference_allowed_hosts", "ingest_nats_urls", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(h.strip() for h in value.split(",") if h.strip())
        return value

    @field_validator("nats_pid_files", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(Path(p.strip()) for p in value.split(",") if p.strip())
        return value

    @field_validator("mqtt_url", "device_mqtt_url")
    @classmethod
    def _check_broker_urls(cls, value: str | None) -> str | None:
        if value:
            try:
                parse_broker_urls(value)
            except BrokerURLError as exc:
                raise ValueError(str(exc)) from exc
        return value or None

    @model_validator(mode="after")
    def _nats_limits(self) -> Settings:
        if self.nats_users_file is None:
            return self
        if self.mqtt_password_file is not None:
            raise ValueError("set SLMOPS_NATS_USERS_FILE or SLMOPS_MQTT_PASSWORD_FILE, not both")
        if self.mqtt_ingest_group is not None:  # NATS 2.9 and 2.10 implement no $share/ subscriptions
            raise ValueError("SLMOPS_MQTT_INGEST_GROUP needs shared subscriptions, which NATS' MQTT lacks")
        if self.mqtt_protocol == "5":
            raise ValueError("NATS speaks MQTT 3.1.1 only: SLMOPS_MQTT_PROTOCOL must be 3.1.1")
        return self

    @field_validator("mqtt_topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "#+"):
            raise ValueError("SLMOPS_MQTT_TOPIC_PREFIX must be a plain topic path like 'slmops/v1'")
        return value

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.blob_store == "s3" and not self.s3_bucket:
            raise ValueError("SLMOPS_BLOB_STORE=s3 requires SLMOPS_S3_BUCKET")
        return self

    @model_validator(mode="after")
    def _jetstream_needs_nats(self) -> Settings:
        if self.ingest_source == "jetstream" and not (self.ingest_nats_urls and self.mqtt_url):
            # The embedded broker is no NATS server: devices must publish where the stream captures.
            raise ValueError("SLMOPS_INGEST_SOURCE=jetstream requires SLMOPS_INGEST_NATS_URLS and SLMOPS_MQTT_URL")
        return self

    @model_validator(mode="after")
    def _production_needs_postgres(self) -> Settings:
        if self.environment == "production" and self.database_url is None:
            raise ValueError("SLMOPS_ENVIRONMENT=production requires SLMOPS_DATABASE_URL (PostgreSQL)")
        return self

    @model_validator(mode="after")
    def _production_signs_releases(self) -> Settings:
        if self.environment == "production" and not self.release_signing:
            raise ValueError("SLMOPS_ENVIRONMENT=production requires SLMOPS_RELEASE_SIGNING=true")
        return self

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("SLMOPS_TLS_CERT_FILE and SLMOPS_TLS_KEY_FILE must be set both or neither")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def tls_files(self) -> tuple[Path, Path] | None:
        """(certificate, key) when TLS is on."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return self.tls_cert_file, self.tls_key_file

    @cached_property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'slmops.db').resolve()}"

    @property
    def device_ca_path(self) -> Path:
        return self.device_ca_dir or self.data_dir / "device-ca"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls_enabled else "http"
        return self.public_url or f"{scheme}://{self.host}:{self.port}"
