"""The agent's settings: a TOML file (`--config`) overridden by `SLMOPS_AGENT_*` environment variables."""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edge_agent.errors import AgentError
from edge_agent.tls import plaintext_problem
from shared.mqtt.errors import BrokerURLError
from shared.mqtt.url import parse_broker_urls

_config_file: ContextVar[Path | None] = ContextVar("agent_config_file", default=None)


class ConfigError(AgentError):
    code = "invalid_config"


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_AGENT_", extra="forbid")

    control_plane_url: str | None = Field(
        default=None, description="The control plane's URL (enrollment, downloads, credential rotation)."
    )
    mqtt_url: str | None = Field(
        default=None,
        description="Broker URL, or a cluster's node URLs comma-separated (failover); default: the one the "
        "control plane hands over at enrollment.",
    )
    allow_insecure_http: bool = Field(
        default=False,
        description="Allow `http://` and `mqtt://` to hosts other than loopback (development only: the device "
        "credential would travel in clear).",
    )
    ca_bundle: Path | None = Field(
        default=None, description="PEM CAs for the control plane, downloads and MQTT; default: the system store."
    )
    x509_identity: bool = Field(
        default=False, description="Send a CSR at enrollment; MQTT with the certificate (mTLS listener)."
    )
    enrollment_token: SecretStr | None = Field(
        default=None, description="One-time token from `POST /v1/devices`; used once, then the credential file."
    )
    credential_file: Path | None = Field(
        default=None, description="The device credential (mode 0600); default `<data_dir>/credential.json`."
    )
    data_dir: Path = Field(
        default=Path("/var/lib/slmops-agent"), description="Model store, credential, state, trust and spool files."
    )
    desired_file: Path | None = Field(
        default=None, description="Watched desired-state file; default: `<data_dir>/desired.json`."
    )

    listen_host: str = Field(
        default="127.0.0.1", description="Address of the local inference API (loopback by default)."
    )
    listen_port: int = Field(
        default=8088, ge=0, le=65535, description="Port of the local inference API (0: any free port)."
    )
    threads: int | None = Field(default=None, ge=1, description="Inference threads; default: the runtime's choice.")
    max_request_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest body the local API reads; a larger one is refused (413) unread.",
    )
    max_queued_requests: int = Field(
        default=16, ge=0, description="Requests that may wait behind the one generating; more are refused (429)."
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Origins browsers may call the local API from (none: CORS off)."
    )

    telemetry_window_s: float = Field(default=60.0, gt=0, description="Length of one telemetry window.")
    disk_quota_mb: int | None = Field(default=None, ge=1, description="The model store's limit.")
    keep_versions: int = Field(
        default=2, ge=2, description="Versions kept in the store: current + previous at least, so rollback works."
    )
    memory_budget_mb: int | None = Field(default=None, ge=1, description="Cap on the memory the agent plans to use.")

    smoke_timeout_s: float = Field(
        default=30.0, gt=0, description="Time a new model has to load and answer its smoke test."
    )
    trial_requests: int = Field(
        default=20, ge=1, description="Healthy requests after which a model on trial is committed."
    )
    trial_seconds: float = Field(
        default=120.0, gt=0, description="Trial length after which a model with no errors is committed."
    )
    trial_max_errors: int = Field(
        default=3, ge=1, description="Failed requests during the trial that roll the model back."
    )
    max_activation_attempts: int = Field(
        default=2, ge=1, description="Activations tried again after a crash mid-activation."
    )

    download_retries: int = Field(default=5, ge=0, description="Retries of a failed download (HTTP Range resume).")
    download_backoff_s: float = Field(
        default=1.0, ge=0, description="First pause between download retries (doubles each time)."
    )
    download_backoff_max_s: float = Field(default=60.0, ge=0, description="Longest pause between download retries.")
    download_timeout_s: float = Field(default=30.0, gt=0, description="Per read: a stalled server counts as failed.")
    download_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts, addresses or CIDR networks an artifact URL or redirect may name although private "
        "(a LAN mirror).",
    )

    watch_interval_s: float = Field(default=1.0, gt=0, description="How often the desired-state file is checked.")
    root_metadata_file: Path | None = Field(
        default=None,
        description="The operator's root.json (slmops keys init): releases are verified against it. Unset: the "
        "root the control plane sent at enrollment is trusted on first use (edge_agent.trust).",
    )
    credential_check_s: float = Field(default=300.0, gt=0, description="How often to ask whether to rotate.")
    log_json: bool = Field(default=False, description="Log one JSON object per line instead of plain text.")
    log_level: str = Field(default="INFO", description="Level of the agent's log.")

    @model_validator(mode="after")
    def _check_enrollment(self) -> AgentSettings:
        if self.enrollment_token is not None and not self.control_plane_url:
            raise ValueError("enrollment_token is set but control_plane_url is not")
        return self

    @model_validator(mode="after")
    def _check_transport(self) -> AgentSettings:
        if self.ca_bundle is not None and not self.ca_bundle.is_file():
            raise ValueError(f"ca_bundle {self.ca_bundle} is not a file")
        if self.mqtt_url:
            try:
                parse_broker_urls(self.mqtt_url)
            except BrokerURLError as exc:
                raise ValueError(str(exc)) from exc
        urls = [self.control_plane_url, *(self.mqtt_url or "").split(",")]
        for url in urls:
            if url and not self.allow_insecure_http and (problem := plaintext_problem(url.strip())):
                raise ValueError(problem)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then the environment, then the TOML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def credential_path(self) -> Path:
        return self.credential_file or self.data_dir / "credential.json"

    @property
    def client_cert_path(self) -> Path:
        return self.data_dir / "device.crt"

    @property
    def client_key_path(self) -> Path:
        return self.data_dir / "device.key"

    @property
    def desired_path(self) -> Path:
        return self.desired_file or self.data_dir / "desired.json"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.json"

    @property
    def trust_path(self) -> Path:
        return self.data_dir / "trust.json"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.listen_host in ("0.0.0.0", "::", "") else self.listen_host
        return f"http://{host}:{self.listen_port}"


def load_settings(config_file: Path | None = None, **overrides: object) -> AgentSettings:
    """Read and validate settings; raise ConfigError naming every bad field."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")
    token = _config_file.set(config_file)
    try:
        return AgentSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        where = f" in {config_file} or SLMOPS_AGENT_* environment" if config_file else ""
        raise ConfigError(f"invalid agent settings{where}: {problems}") from exc
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise ConfigError(f"cannot read config {config_file}: {exc}") from exc
    finally:
        _config_file.reset(token)
