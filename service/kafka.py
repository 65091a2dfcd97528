"""The Kafka shell: client options, topic set-up, and retrying it at start.

Everything here is thin on purpose; the decisions live in ``signature`` and ``fsm``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from service.backoff import Backoff, Deadline
from service.settings import Settings

log = structlog.get_logger(logger_name="callstatus.kafka")

DAY_MS = 24 * 3600 * 1000
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    configs: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The four topics of docs/architecture.md section 4, with their cleanup policies.

    Every topic gets ``min.insync.replicas = min(2, replication)``: with ``acks=all`` a
    write then survives the loss of any one broker, while a single-broker development
    cluster still works. Every topic takes records as large as the biggest body can make
    them (with the broker's 1 MiB default a large body would get 503 forever, and its
    change could not be written).
    """
    durable = {
        "min.insync.replicas": str(min(2, settings.topic_replication_factor)),
        "max.message.bytes": str(settings.producer_max_request_bytes),
    }
    return [
        TopicSpec(settings.topic_ingest, {"retention.ms": str(7 * DAY_MS), **durable}),
        TopicSpec(settings.topic_changes, {"retention.ms": str(7 * DAY_MS), **durable}),
        TopicSpec(settings.topic_rejected, {"retention.ms": str(30 * DAY_MS), **durable}),
        # Compacted: the latest state of each call survives; tombstones delete it.
        TopicSpec(settings.topic_state, {"cleanup.policy": "compact", **durable}),
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
            deadline = Deadline(30)
            counts = await _partition_counts(admin, names)
            while len(counts) < len(names) and not deadline.expired:
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
    deadline = Deadline(deadline_seconds)
    backoff = Backoff(first=0.5, cap=5.0)
    while True:
        try:
            return await step()
        except KafkaError as exc:
            if deadline.expired:
                raise
            log.warning("kafka not reachable yet, retrying", step=what, error=repr(exc))
            await asyncio.sleep(min(backoff.next_delay(), deadline.remaining))
