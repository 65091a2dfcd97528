"""The Kafka shell: client options, topic set-up, and retrying it at start.

Everything here is thin on purpose; the decisions live in ``signature`` and ``fsm``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    for_code,
)
from aiokafka.helpers import create_ssl_context

from service.backoff import Backoff, Deadline
from service.settings import Settings

log = structlog.get_logger(logger_name="callstatus.kafka")

DAY_MS = 24 * 3600 * 1000
T = TypeVar("T")

# The largest state record the processor writes: a packed state is 27 + 8 x 32 bytes
# (service/statecodec.py), its key a 42-character callId, plus record and batch framing.
# Generous, so only a topic limit that no state could live with refuses the start.
STATE_RECORD_MAX_BYTES = 4096


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


def role_topics(settings: Settings) -> list[str]:
    """The topics this process's stages use: ingest alone writes only the ingest topic,
    and with least-privilege ACLs (service/acls.py) it may not even see the others."""
    if settings.role.runs_processor:
        return list(settings.topic_names)
    return [settings.topic_ingest]


async def ensure_topics(settings: Settings) -> dict[str, int]:
    """Create missing topics (when allowed) and return the partition count of each topic
    this role uses (:func:`role_topics`).

    The processor writes a call's state to the state partition with the same number as
    its ingest partition, so the two counts must match; we refuse to start otherwise
    rather than silently scatter state.
    """
    names = role_topics(settings)
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        counts = await _partition_counts(admin, names)
        missing = [
            spec for spec in topic_specs(settings) if spec.name in names and spec.name not in counts
        ]
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
            "CALLSTATUS_CREATE_TOPICS=true; with ACLs, a topic this user may not Describe "
            "looks missing too)"
        )
    # Only the processor places state by ingest partition (ingest does not see state).
    ingest, state = counts[settings.topic_ingest], counts.get(settings.topic_state)
    if settings.role.runs_processor and ingest != state:
        raise TopicLayoutError(
            f"{settings.topic_ingest} has {counts[settings.topic_ingest]} partitions but "
            f"{settings.topic_state} has {counts[settings.topic_state]}; they must be equal "
            "because each call's state lives in the partition numbered like its ingest one"
        )
    await _check_record_limits(settings)
    return counts


def record_sizes(settings: Settings) -> dict[str, int]:
    """The largest record batch the service writes to each topic. Ingest writes records
    up to the producer's max request size; a change or a rejection carries the whole
    call, so the processor's producers are sized the same; a state record is small, but
    the processor writes states in batches of up to ``processor_batch_bytes`` that
    barely compress, and Kafka refuses an oversized batch whole."""
    largest = settings.producer_max_request_bytes
    return {
        settings.topic_ingest: largest,
        settings.topic_changes: largest,
        settings.topic_rejected: largest,
        settings.topic_state: max(STATE_RECORD_MAX_BYTES, settings.processor_batch_bytes),
    }


async def _check_record_limits(settings: Settings) -> None:
    """Refuse to start when a topic's ``max.message.bytes`` is below the largest record
    the service writes to it. Found at run time instead, such a record would be answered
    202 from the spool and then refused by Kafka on every retry, blocking the spool: the start is
    where one line can name the topic and the setting to change."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        limits = await record_limits_once_known(admin, role_topics(settings))
    finally:
        await admin.close()
    too_small = []
    for topic, limit_and_where in limits.items():
        needed = record_sizes(settings)[topic]
        limit, where = limit_and_where
        if limit < needed:
            too_small.append(
                f"{topic} takes records up to {limit} bytes ({where}) but the service "
                f"writes records up to {needed} bytes to it"
            )
    if too_small:
        raise TopicLayoutError(
            "; ".join(too_small)
            + ". Raise the topic's max.message.bytes (e.g. kafka-configs --alter "
            "--entity-type topics --add-config max.message.bytes=N), or lower "
            "CALLSTATUS_MAX_BODY_BYTES: records are sized 2 x MAX_BODY_BYTES + 16 KiB"
        )


async def record_limits_once_known(
    admin: AIOKafkaAdminClient, topics: list[str], seconds: float = 30.0
) -> dict[str, tuple[int, str]]:
    """:func:`_record_limits`, asked again while the broker asked does not know a topic
    yet: a topic just created is in the controller's metadata before every broker has
    it, and DescribeConfigs may go to one that has not (seen on a 3-node cluster: the
    node refused to start, "unknown topic", a moment after creating the topic)."""
    deadline = Deadline(seconds)
    while True:
        try:
            return await _record_limits(admin, topics)
        except UnknownTopicOrPartitionError:
            if deadline.expired:
                raise
        await asyncio.sleep(0.2)  # a broker's metadata catches up within moments


async def _record_limits(
    admin: AIOKafkaAdminClient, topics: list[str]
) -> dict[str, tuple[int, str]]:
    """Each topic's effective ``max.message.bytes`` and where it comes from. A broker
    reports a topic without an override with the broker's ``message.max.bytes``; where
    one reports nothing for it, that broker default is read explicitly."""
    [described] = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t, {"max.message.bytes": None}) for t in topics]
    )
    limits: dict[str, tuple[int, str]] = {}
    missing = []
    for error_code, _, _, name, entries, *_ in described.resources:
        if for_code(error_code) is TopicAuthorizationFailedError:
            # The check is a safety net, not a reason to refuse a cluster whose ACLs do
            # not grant DescribeConfigs: the processor and the spool's dead-letter
            # directory still keep a refused record from blocking anything.
            log.warning(
                "not allowed to read the topic's max.message.bytes; record sizes unchecked",
                topic=name,
            )
            limits[name] = (sys.maxsize, "unchecked")
            continue
        if error_code:
            raise for_code(error_code)(f"describe configs of {name}")
        found = [entry for entry in entries if entry[0] == "max.message.bytes"]
        if found and found[0][1] is not None:
            limits[name] = (int(found[0][1]), _origin(found[0][3]))
        else:
            missing.append(name)
    if missing:
        default = await _broker_message_max_bytes(admin)
        for name in missing:
            limits[name] = (default, "the broker's message.max.bytes")
    return limits


def _origin(source: bool | int) -> str:
    """Where a described topic setting comes from: DescribeConfigs v0 says whether it is
    a default, later versions name the source (1: the topic's own override)."""
    overridden = not source if isinstance(source, bool) else source == 1
    return "its max.message.bytes" if overridden else "the broker's message.max.bytes"


async def _broker_message_max_bytes(admin: AIOKafkaAdminClient) -> int:
    cluster = await admin.describe_cluster()
    broker = cluster["controller_id"]
    if broker < 0:  # no controller named: any broker reports the cluster's default
        broker = cluster["brokers"][0]["node_id"]
    [described] = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.BROKER, str(broker), {"message.max.bytes": None})]
    )
    for _, _, _, _, entries, *_ in described.resources:
        for entry in entries:
            if entry[0] == "message.max.bytes" and entry[1] is not None:
                return int(entry[1])
    return 1048588  # Kafka's documented default for message.max.bytes


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


async def event_ids_written(
    options: dict[str, Any], topic: str, wanted: set[str], since_ms: int, until_ms: int
) -> set[str]:
    """Which of ``wanted`` (``ce_id`` headers) are on ``topic`` among the records whose
    timestamps fall from ``since_ms`` on, reading each partition from the first record
    at or after ``since_ms`` to the first at or after ``until_ms`` (or its end). Record
    timestamps are the producer's CreateTime, so the window must allow for the writers'
    clock skew. Used once at start after a crash mid-drain (service/publisher.py)."""
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False)
    await consumer.start()
    found: set[str] = set()
    try:
        count = (await partition_counts(options, [topic])).get(topic, 0)
        partitions = [TopicPartition(topic, p) for p in range(count)]
        starts = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
        ends = await consumer.offsets_for_times({tp: until_ms for tp in partitions})
        last = await consumer.end_offsets(partitions)
        todo: dict[TopicPartition, int] = {}
        consumer.assign(partitions)
        for tp in partitions:
            start, end = starts.get(tp), ends.get(tp)
            stop = end.offset if end is not None else last[tp]
            if start is None or start.offset >= stop:
                continue
            consumer.seek(tp, start.offset)
            todo[tp] = stop
        while todo and found != wanted:
            batches = await consumer.getmany(*todo, timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= todo.get(tp, -1):
                        todo.pop(tp, None)
                        break
                    for name, value in record.headers:
                        if (
                            name == "ce_id"
                            and (event_id := value.decode(errors="replace")) in wanted
                        ):
                            found.add(event_id)
                if tp in todo and await consumer.position(tp) >= todo[tp]:
                    todo.pop(tp)
    finally:
        await consumer.stop()
    return found
