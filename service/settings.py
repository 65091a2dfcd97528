"""Every setting of the service, defined once and read once at start.

Values come from environment variables prefixed ``CALLSTATUS_``. For local play
``make run`` keeps a generated signing secret in ``.callstatus.env`` (ignored by git);
that file is read too, but the environment always wins over it.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.call import AccountId

# The local, git-ignored file where `make run` keeps its generated signing secret.
LOCAL_ENV_FILE = Path(".callstatus.env")


# Bytes an ingest record adds around twice the body: eventId, receivedAt, source, the
# field names of the envelope and of the call, dates rewritten with milliseconds, the
# Kafka headers (ce_id, traceparent) and the record batch framing. Generous on purpose.
INGEST_RECORD_OVERHEAD = 16 * 1024
# Of that, what the record's headers (content-type, ce_id, a traceparent of at most 128
# characters) and Kafka's record and batch framing may take.
RECORD_FRAMING = 1024


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
        # A refused value is named, never echoed: it may be a secret.
        hide_input_in_errors=True,
    )

    kafka_bootstrap_servers: str = "localhost:9092"
    # Managed clusters (Strimzi with TLS/SCRAM, cloud Kafka) need these; see client_options.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # The same two read from files (a mounted Secret, e.g. Strimzi's KafkaUser Secret),
    # once at start; see _read_credential_files. Explicit *_FILE settings rather than
    # pydantic-settings' secrets_dir: that one looks in a single directory for files
    # named after the fields, silently skips a missing one and lets the environment
    # quietly win, where a half-mounted Secret must stop the start with its path named.
    kafka_sasl_username_file: Path | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: FilePath | None = None
    kafka_ssl_certfile: FilePath | None = None
    kafka_ssl_keyfile: FilePath | None = None
    # NoDecode: a plain comma-separated list, not JSON. SecretStr: a repr, a log line or
    # an error shows "**********", never the value.
    signing_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # The accounts (service/accounts.py). Either an accounts file (YAML or JSON, schema
    # schemas/config/accounts.schema.json): per FreeClimb account id its signing secrets
    # and API key; a request must be signed with a secret of the account it is for. It
    # is watched: a new version is used within ACCOUNTS_RELOAD_SECONDS, without a
    # restart, and a bad new version keeps the last good one. Or, without a file,
    # SIGNING_SECRETS above: the one-account shorthand. Its secrets are bound to
    # SIGNING_ACCOUNT_ID when that is set (requests for any other account are refused);
    # left unset, they verify requests for any account, as before accounts existed, so
    # upgrading with SIGNING_SECRETS alone changes nothing. Not both the file and the
    # secrets: which one is meant cannot be told.
    accounts_file: Path | None = None
    accounts_reload_seconds: float = Field(default=5.0, gt=0, le=3600)
    signing_account_id: AccountId | None = None
    verify_signatures: bool = True
    signature_tolerance_seconds: int = Field(default=300, ge=1, le=3600)
    max_body_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)
    # A client has this long to send the whole body (408 after, checked about once a
    # second): a slow sender cannot hold a socket and a buffer for as long as it likes.
    body_read_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Open connections the HTTP server holds (service/frontdoor.py). Past it, a new one
    # closes the connection that has waited longest for a request head; only when all
    # have a request in flight is the new one closed instead.
    max_connections: int = Field(default=1000, ge=1, le=100_000)
    # A connection that has not sent a complete request head (request line and headers)
    # this long after it connected, or after its last response, is closed. Bytes that
    # trickle in do not extend it. Checked ten times a second.
    header_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    # Largest request head, and most header fields, taken; past either, 431 and close.
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    max_header_fields: int = Field(default=100, ge=8, le=10_000)
    # How many recently stored events ingest remembers (~250 bytes each), so that the
    # same signed request again is answered 202 without a second write; 0: none.
    replay_cache_entries: int = Field(default=20_000, ge=0, le=10_000_000)
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
    # A send still unacknowledged this long after its request arrived finishes the
    # producer, and its buffer is dropped: the bound on how late a 503'd event can land.
    produce_delivery_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Cap on the producer's in-flight buffer: a full buffer answers 503 instead of queueing.
    max_inflight_produces: int = Field(default=1000, ge=1)

    # The local spool (service/spool.py): where ingest makes an event durable when Kafka
    # cannot take it in time, answering 202 instead of 503.
    spool_enabled: bool = True
    spool_dir: Path = Path(".callstatus-spool")
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)

    consumer_group: str = "callstatus-processor"
    state_terminal_retention_seconds: int = Field(default=3600, ge=0)
    state_idle_retention_seconds: int = Field(default=6 * 3600, ge=1)
    # How far ahead of the processor's clock an ingest record's receivedAt may be and
    # still move its partition's watermark (docs/architecture.md, section 7). Past it the
    # event is judged but the watermark stays: one forged or clock-jumped record must not
    # retire every state of its partition. Well above NTP skew, well below the retentions.
    max_clock_skew_seconds: int = Field(default=300, ge=1, le=3600)
    # Upper bound on the events one fetch carries; each partition's share of it is one
    # transaction. A transaction costs four round trips to the broker, and a commit
    # marker on every partition it wrote, whatever its size, so bigger batches amortise
    # them: 500 -> 2,000 took the benchmark's processor from ~9,400 to ~17,000 events/s,
    # and 2,000 -> 6,000 from 22,400-27,400 to 28,400-31,500 (3 rounds each, alternated,
    # 50,000 lifecycles, one quiet 2-core machine); 10,000 bought no more. A batch Kafka
    # refuses part of is narrowed by halves (batch.Narrowing), so its size no longer
    # bounds how long finding the culprit takes. Batches are only as big as the
    # backlog: at a steady trickle each holds what arrived since the last, so latency
    # does not grow with it.
    processor_batch_max: int = Field(default=6000, ge=1)
    # Codec of what the processor writes (changes, rejected, state). Compressed, fewer
    # bytes go through the sockets: 20% of the processor's CPU was writing produce
    # requests uncompressed. snappy: a change record costs 1.4 µs to compress to ~175
    # bytes (of ~920); aiokafka's lz4 is level 9 (LZ4 HC), 4.7 µs for ~150 bytes, and
    # zstd 2.1 µs for ~90. Every Kafka client reads snappy; "none" for those that cannot.
    processor_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "snappy"

    # Reconciliation with FreeClimb's REST API (service/reconciler.py, docs/architecture.md
    # section 12). Off unless an API key is configured: FREECLIMB_ACCOUNT_ID with
    # FREECLIMB_API_KEY (or its _FILE) for one account without an accounts file, or the
    # apiKey of each account in the accounts file.
    freeclimb_api_url: str = "https://www.freeclimb.com/apiserver"
    freeclimb_account_id: AccountId | None = None
    freeclimb_api_key: SecretStr | None = None
    freeclimb_api_key_file: Path | None = None
    # A call held non-terminal this long after its last event is fetched from the API.
    # FreeClimb calls last minutes (the median is well under 5), and a callback lost
    # leaves its call stuck for good; 15 minutes leaves a call time to end and its
    # callback time to arrive, and bounds how long a lost end stays unknown.
    reconcile_after_seconds: float = Field(default=900.0, gt=0, le=7 * 86400)
    # Every this many seconds, each account's recently ended calls are listed (0 = off).
    reconcile_sweep_seconds: float = Field(default=300.0, ge=0, le=86400)
    # The longest call the sweep finds: it lists calls started within this much (plus
    # two sweeps) before now and ended by now, and never further back than the terminal
    # retention allows (docs/architecture.md section 12). Longer ones we know of are
    # trigger 1's. 40 min + 2 sweeps = 50 min, inside the default 1 h retention.
    reconcile_sweep_lookback_seconds: float = Field(default=2400.0, gt=0, le=7 * 86400)

    # On SIGTERM: answer /readyz with 503 for this long while still serving, so the load
    # balancer stops sending before the listener closes (Kubernetes: a few seconds).
    drain_delay_seconds: float = Field(default=0.0, ge=0, le=60)
    # Then: how long in-flight requests and the processor's transaction may take to end.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=300)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    @model_validator(mode="before")
    @classmethod
    def _read_credential_files(cls, data: object) -> object:
        """Fill ``kafka_sasl_username`` / ``_password`` from their ``_FILE`` settings.
        The value and its file together are refused: which one is meant cannot be told."""
        if not isinstance(data, dict):
            return data
        values = dict(data)
        for field in ("kafka_sasl_username", "kafka_sasl_password", "freeclimb_api_key"):
            path = values.get(f"{field}_file")
            if path is None:
                continue
            variable = f"CALLSTATUS_{field.upper()}"
            if values.get(field) is not None:
                raise ValueError(f"set {variable} or {variable}_FILE, not both")
            values[field] = _read_secret_file(Path(str(path)), f"{variable}_FILE")
        return values

    @field_validator("signing_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("accounts_file", "signing_account_id", "freeclimb_account_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `CALLSTATUS_ACCOUNTS_FILE=` (empty) is unset, not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("freeclimb_api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        # Checked here, at start: found only when the reconciler builds its client, a
        # bad URL would end reconciliation while the node stays ready.
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise ValueError("must be an http(s) URL without a query, like the default")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.accounts_file is not None and self.signing_secrets:
            local = f" (the secrets may come from {LOCAL_ENV_FILE})" * LOCAL_ENV_FILE.exists()
            raise ValueError(
                f"set CALLSTATUS_ACCOUNTS_FILE or CALLSTATUS_SIGNING_SECRETS, not both{local}"
            )
        if self.signing_account_id is not None and not self.signing_secrets:
            raise ValueError(
                "CALLSTATUS_SIGNING_ACCOUNT_ID names the account of CALLSTATUS_SIGNING_SECRETS, "
                "which is empty"
            )
        if (
            self.role.runs_ingest
            and self.verify_signatures
            and not self.signing_secrets
            and self.accounts_file is None
        ):
            raise ValueError(
                "CALLSTATUS_SIGNING_SECRETS is empty while signatures are verified; "
                "set it or CALLSTATUS_ACCOUNTS_FILE, or CALLSTATUS_VERIFY_SIGNATURES=false "
                "for local play only"
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
        if self.produce_delivery_timeout_seconds <= self.produce_timeout_seconds:
            raise ValueError(
                "CALLSTATUS_PRODUCE_DELIVERY_TIMEOUT_SECONDS must be longer than "
                "CALLSTATUS_PRODUCE_TIMEOUT_SECONDS (a send must be given its answer "
                "deadline before it is dropped)"
            )
        replay_window = 2 * self.signature_tolerance_seconds
        for name, retention in (
            ("STATE_TERMINAL_RETENTION_SECONDS", self.state_terminal_retention_seconds),
            ("STATE_IDLE_RETENTION_SECONDS", self.state_idle_retention_seconds),
        ):
            # A signed request is accepted up to the tolerance on either side of our
            # clock, so an original and its replay can arrive twice the tolerance apart.
            # Each retention forgets a call (finished, or merely quiet); forgotten sooner,
            # the replay would be taken as a new first event: a second change.
            if retention < replay_window:
                raise ValueError(
                    f"CALLSTATUS_{name} ({retention}) must be at least twice "
                    "CALLSTATUS_SIGNATURE_TOLERANCE_SECONDS "
                    f"({self.signature_tolerance_seconds})"
                )
        if (self.freeclimb_account_id is None) != (self.freeclimb_api_key is None):
            raise ValueError(
                "CALLSTATUS_FREECLIMB_ACCOUNT_ID and CALLSTATUS_FREECLIMB_API_KEY go together"
            )
        if self.freeclimb_api_key is not None and self.accounts_file is not None:
            raise ValueError(
                "set CALLSTATUS_FREECLIMB_API_KEY or apiKey in CALLSTATUS_ACCOUNTS_FILE, not both"
            )
        self._check_sweep_window()
        topics = self.topic_names
        if len(set(topics)) != len(topics):
            raise ValueError("the four CALLSTATUS_TOPIC_* names must be distinct")
        return self

    def _check_sweep_window(self) -> None:
        """Refuses a sweep window that the terminal retention would cut short, where a
        reconciler is sure to run: a processor node with CALLSTATUS_FREECLIMB_API_KEY.
        With only an accounts file (which may never hold an apiKey) the reconciler
        warns instead when it turns on: refusing would stop nodes that do not
        reconcile at all, such as an upgrade that kept a short retention."""
        problem = self.sweep_window_problem()
        if problem is not None and self.freeclimb_api_key is not None:
            raise ValueError(problem)

    def sweep_window_problem(self) -> str | None:
        """Why the sweep cannot look back as far as configured (None: it can). It lists
        calls back over LOOKBACK + 2 sweeps; each must still have its state then (ended
        less than the terminal retention ago, less the clock skew and a sweep of slack),
        or listing it again would be a first event: a second change on changes. So
        :func:`service.reconcile.sweep_window` cuts the window to the retention, and
        calls longer than what is left are found by no sweep (docs/architecture.md
        section 12)."""
        sweep = self.reconcile_sweep_seconds
        if not (self.role.runs_processor and sweep > 0):
            return None
        window = self.reconcile_sweep_lookback_seconds + 2 * sweep
        bound = self.state_terminal_retention_seconds - self.max_clock_skew_seconds - sweep
        if window <= bound:
            return None
        lookback = _n(self.reconcile_sweep_lookback_seconds)
        retention = self.state_terminal_retention_seconds
        return (
            "the reconcile sweep reaches past the calls' retention: "
            f"CALLSTATUS_RECONCILE_SWEEP_LOOKBACK_SECONDS ({lookback}) + 2 x "
            f"CALLSTATUS_RECONCILE_SWEEP_SECONDS ({_n(sweep)}) = {_n(window)} s must be "
            f"at most CALLSTATUS_STATE_TERMINAL_RETENTION_SECONDS ({retention}) - "
            f"CALLSTATUS_MAX_CLOCK_SKEW_SECONDS ({self.max_clock_skew_seconds}) - "
            f"CALLSTATUS_RECONCILE_SWEEP_SECONDS = {_n(bound)} s; shorten the lookback or "
            "the sweep, keep ended calls longer, or set CALLSTATUS_RECONCILE_SWEEP_SECONDS=0 "
            "to turn the sweep off"
        )

    @property
    def producer_max_request_bytes(self) -> int:
        """The largest ingest record the producer must send (its ``max_request_size``, and
        the topics' ``max.message.bytes``). An ordinary record carries the body about
        twice (byte for byte, and its fields again in ``call`` or ``requestType``) plus the
        envelope, headers and batch framing, which INGEST_RECORD_OVERHEAD bounds. The
        handler refuses, with 413, the rare body whose record would not fit (numbers that
        grow when written back, such as 1e15 in subresourceUris)."""
        return 2 * self.max_body_bytes + INGEST_RECORD_OVERHEAD

    @property
    def processor_batch_bytes(self) -> int:
        """The processor's record batches (per topic partition, per produce request): up
        to half the largest record, instead of aiokafka's 16 KiB, so a partition batch's
        outputs go in a few produce requests rather than tens. State records barely
        compress (marks and digests), so the state topic must take a batch this large,
        and the start checks it does (service/kafka.py record_sizes): Kafka refuses an
        oversized batch whole, and aiokafka never splits one."""
        return self.producer_max_request_bytes // 2

    @property
    def max_ingest_value_bytes(self) -> int:
        """The largest ingest record value (plus key) the handler writes: what is left of
        the producer's max request size after headers and batch framing."""
        return self.producer_max_request_bytes - RECORD_FRAMING

    @property
    def topic_names(self) -> tuple[str, str, str, str]:
        return (self.topic_ingest, self.topic_changes, self.topic_rejected, self.topic_state)


def _n(seconds: float) -> str:
    """Seconds as a person writes them: 300, not 300.0."""
    return f"{seconds:g}"


def _read_secret_file(path: Path, variable: str) -> str:
    """A credential file's content without the line end an editor or `kubectl create
    secret --from-file` leaves (a Secret's key mounted as a file has none). Errors name
    the variable and the path, never any of the content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"{variable}: cannot read {path}: {reason}") from None
    value = text.rstrip("\r\n")
    if not value:
        raise ValueError(f"{variable}: {path} is empty")
    return value


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
