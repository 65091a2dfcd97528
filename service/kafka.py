"""The Kafka shell: topic set-up and the ingest producer.

Everything here is thin on purpose; the decisions live in ``signature`` and ``fsm``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from service import metrics
from service.settings import Settings

log = structlog.get_logger(logger_name="callstatus.kafka")

DAY_MS = 24 * 3600 * 1000
T = TypeVar("T")

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    configs: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The four topics of docs/architecture.md section 4, with their cleanup policies."""
    return [
        TopicSpec(settings.topic_ingest, {"retention.ms": str(7 * DAY_MS)}),
        TopicSpec(settings.topic_changes, {"retention.ms": str(7 * DAY_MS)}),
        TopicSpec(settings.topic_rejected, {"retention.ms": str(30 * DAY_MS)}),
        # Compacted: the latest state of each call survives; tombstones delete it.
        TopicSpec(settings.topic_state, {"cleanup.policy": "compact"}),
    ]


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection options shared by every Kafka client the service creates (producers,
    consumers, admin), so security settings are written in one place."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # guaranteed by Settings
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password.get_secret_value(),
        )
    if settings.kafka_security_protocol.endswith("SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
        )
    return options


class TopicLayoutError(RuntimeError):
    """The topics exist but cannot be used as they are."""


async def ensure_topics(settings: Settings) -> dict[str, int]:
    """Create missing topics (when allowed) and return each topic's partition count.

    The processor writes a call's state to the state partition with the same number as
    its ingest partition, so the two counts must match; we refuse to start otherwise
    rather than silently scatter state.
    """
    names = list(settings.topic_names)
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        counts = await _partition_counts(admin, names)
        missing = [spec for spec in topic_specs(settings) if spec.name not in counts]
        if missing and settings.create_topics:
            await admin.create_topics(
                [
                    NewTopic(
                        spec.name,
                        settings.topic_partitions,
                        settings.topic_replication_factor,
                        topic_configs=spec.configs,
                    )
                    for spec in missing
                ]
            )
            log.info("topics created", topics=[spec.name for spec in missing])
            # A just-created topic takes a moment to show up in metadata.
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 30
            counts = await _partition_counts(admin, names)
            while len(counts) < len(names) and loop.time() < give_up:
                await asyncio.sleep(0.2)
                counts = await _partition_counts(admin, names)
    finally:
        await admin.close()
    absent = [name for name in names if name not in counts]
    if absent:
        raise TopicLayoutError(
            f"topics missing: {', '.join(absent)} (create them, or set "
            "CALLSTATUS_CREATE_TOPICS=true)"
        )
    if counts[settings.topic_ingest] != counts[settings.topic_state]:
        raise TopicLayoutError(
            f"{settings.topic_ingest} has {counts[settings.topic_ingest]} partitions but "
            f"{settings.topic_state} has {counts[settings.topic_state]}; they must be equal "
            "because each call's state lives in the partition numbered like its ingest one"
        )
    return counts


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    # Describe only topics that exist: aiokafka's metadata request allows auto-creation,
    # and a broker with auto.create.topics.enable would create a missing topic with its
    # defaults (a state topic that is not compacted, the wrong partition count).
    existing = set(await admin.list_topics())
    present = [topic for topic in topics if topic in existing]
    if not present:
        return {}
    described = await admin.describe_topics(present)
    return {t["topic"]: len(t["partitions"]) for t in described if not t["error_code"]}


async def partition_counts(options: dict[str, Any], topics: list[str]) -> dict[str, int]:
    """Partition count of each existing topic (absent topics are left out); ``options``
    as :func:`client_options` makes them."""
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        return await _partition_counts(admin, topics)
    finally:
        await admin.close()


async def retry_at_start(
    step: Callable[[], Awaitable[T]], what: str, deadline_seconds: float = 60.0
) -> T:
    """Run a start-up step, retrying while Kafka is unreachable: in a fresh deployment
    the broker may come up after us. Past the deadline the error stops the process, and
    the supervisor's restart back-off takes over."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_seconds
    while True:
        try:
            return await step()
        except KafkaError as exc:
            if loop.time() >= give_up:
                raise
            log.warning("kafka not reachable yet, retrying", step=what, error=repr(exc))
            await asyncio.sleep(1.0)


class Unavailable(Exception):
    """Kafka did not take the event in time; the caller answers 503."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IngestProducer:
    """Writes validated events to the ingest topic and waits for the broker's ack.

    ``acks=all`` with idempotence: a 202 means every in-sync replica has the event, and
    the producer's own retries cannot write it twice. In-flight sends are capped so a
    slow or absent broker turns into quick 503s instead of an ever-growing queue.
    """

    def __init__(self, settings: Settings) -> None:
        self._topic = settings.topic_ingest
        self._timeout = settings.produce_timeout_seconds
        self._max_inflight = settings.max_inflight_produces
        self._inflight = 0
        self._options = client_options(settings)
        # Created in start(): aiokafka objects must be made inside the running loop.
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            **self._options,
            acks="all",
            enable_idempotence=True,
            linger_ms=1,
            # Fail a send the broker cannot take within our own answer deadline, plus
            # margin, so the buffer drains instead of holding stale events.
            request_timeout_ms=int(self._timeout * 1000) + 5000,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def stop(self) -> None:
        # stop() flushes what is still buffered before closing connections.
        if self._producer is not None:
            await self._producer.stop()

    async def publish(self, key: bytes, value: bytes, headers: Headers) -> None:
        """Return once the broker acknowledged, or raise :class:`Unavailable`.

        On a timeout the event may still reach Kafka later (it sits in the producer's
        buffer); FreeClimb then sees a 503 and may retry, and the processor drops the
        repeated status as a duplicate. The reverse, a 202 for an event Kafka lacks,
        cannot happen.
        """
        if self._producer is None:
            raise Unavailable("not_started")
        if self._inflight >= self._max_inflight:
            metrics.PRODUCE_ERRORS.labels("buffer_full").inc()
            raise Unavailable("buffer_full")
        self._inflight += 1
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(
                    self._topic, value=value, key=key, headers=list(headers)
                ),
                self._timeout,
            )
        except TimeoutError:
            metrics.PRODUCE_ERRORS.labels("timeout").inc()
            raise Unavailable("timeout") from None
        except KafkaError as exc:
            metrics.PRODUCE_ERRORS.labels(type(exc).__name__).inc()
            raise Unavailable(type(exc).__name__) from None
        finally:
            self._inflight -= 1

    async def ready(self) -> bool:
        """True when a broker answers a metadata request now."""
        if self._producer is None:
            return False
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), 2.0)
        except (TimeoutError, KafkaError, OSError):
            return False
        return True
