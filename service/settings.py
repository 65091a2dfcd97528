"""Every setting of the service, defined once and read once at start.

Values come from environment variables prefixed ``CALLSTATUS_``. For local play
``make run`` keeps a generated signing secret in ``.callstatus.env`` (ignored by git);
that file is read too, but the environment always wins over it.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The local, git-ignored file where `make run` keeps its generated signing secret.
LOCAL_ENV_FILE = Path(".callstatus.env")


class Role(StrEnum):
    """Which stages this process runs (docs/architecture.md, section 1)."""

    ALL = "all"
    INGEST = "ingest"
    PROCESSOR = "processor"

    @property
    def runs_ingest(self) -> bool:
        return self in (Role.ALL, Role.INGEST)

    @property
    def runs_processor(self) -> bool:
        return self in (Role.ALL, Role.PROCESSOR)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CALLSTATUS_",
        env_file=LOCAL_ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    kafka_bootstrap_servers: str = "localhost:9092"
    # Managed clusters (Strimzi with TLS/SCRAM, cloud Kafka) need these; see client_options.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: FilePath | None = None
    kafka_ssl_certfile: FilePath | None = None
    kafka_ssl_keyfile: FilePath | None = None
    # NoDecode: a plain comma-separated list, not JSON.
    signing_secrets: Annotated[tuple[str, ...], NoDecode] = ()
    verify_signatures: bool = True
    signature_tolerance_seconds: int = Field(default=300, ge=1, le=3600)
    max_body_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)
    role: Role = Role.ALL
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)

    topic_ingest: str = "freeclimb.call-status.ingest"
    topic_changes: str = "freeclimb.call-status.changes"
    topic_rejected: str = "freeclimb.call-status.rejected"
    topic_state: str = "freeclimb.call-status.state"
    create_topics: bool = True
    topic_partitions: int = Field(default=6, ge=1)
    topic_replication_factor: int = Field(default=1, ge=1)

    # How long the broker may take to acknowledge one ingest write before we answer 503.
    produce_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Cap on the producer's in-flight buffer: a full buffer answers 503 instead of queueing.
    max_inflight_produces: int = Field(default=1000, ge=1)

    consumer_group: str = "callstatus-processor"
    state_terminal_retention_seconds: int = Field(default=3600, ge=0)
    state_idle_retention_seconds: int = Field(default=6 * 3600, ge=1)
    # Upper bound on the events one processor transaction carries.
    processor_batch_max: int = Field(default=500, ge=1)

    # On SIGTERM: answer /readyz with 503 for this long while still serving, so the load
    # balancer stops sending before the listener closes (Kubernetes: a few seconds).
    drain_delay_seconds: float = Field(default=0.0, ge=0, le=60)
    # Then: how long in-flight requests and the processor's transaction may take to end.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=300)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    @field_validator("signing_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.role.runs_ingest and self.verify_signatures and not self.signing_secrets:
            raise ValueError(
                "CALLSTATUS_SIGNING_SECRETS is empty while signatures are verified; "
                "set it, or CALLSTATUS_VERIFY_SIGNATURES=false for local play only"
            )
        sasl = self.kafka_security_protocol.startswith("SASL_")
        has_credentials = self.kafka_sasl_username is not None or self.kafka_sasl_password
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                f"CALLSTATUS_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "CALLSTATUS_KAFKA_SASL_USERNAME and CALLSTATUS_KAFKA_SASL_PASSWORD"
            )
        if has_credentials and not sasl:
            raise ValueError(
                "SASL credentials are set but CALLSTATUS_KAFKA_SECURITY_PROTOCOL is "
                f"{self.kafka_security_protocol}; use SASL_SSL or SASL_PLAINTEXT"
            )
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError("CALLSTATUS_KAFKA_SSL_CERTFILE and _KEYFILE go together")
        if self.state_terminal_retention_seconds < self.signature_tolerance_seconds:
            # A signed redelivery is accepted for the tolerance after it was signed; a
            # finished call forgotten sooner would take it as a new call's first event.
            raise ValueError(
                "CALLSTATUS_STATE_TERMINAL_RETENTION_SECONDS "
                f"({self.state_terminal_retention_seconds}) must be at least "
                f"CALLSTATUS_SIGNATURE_TOLERANCE_SECONDS ({self.signature_tolerance_seconds})"
            )
        topics = self.topic_names
        if len(set(topics)) != len(topics):
            raise ValueError("the four CALLSTATUS_TOPIC_* names must be distinct")
        return self

    @property
    def topic_names(self) -> tuple[str, str, str, str]:
        return (self.topic_ingest, self.topic_changes, self.topic_rejected, self.topic_state)


class SettingsError(Exception):
    """A bad or missing setting, rendered as one readable line."""


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            name = f"CALLSTATUS_{field.upper()}" if field else "settings"
            problems.append(f"{name}: {err['msg']}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
