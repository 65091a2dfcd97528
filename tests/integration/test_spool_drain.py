"""Issue 16, findings 1 and 2, on the real broker and a real file system: a record Kafka
refuses for good no longer blocks the spool (it goes to the dead-letter directory, and
a direct write of one is refused instead of spooled), topics too small for what the
service writes stop the start, and a checkpoint the disk refuses no longer kills the
drainer silently (logged, counted, retried, shown in readiness, healed by itself)."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from service import deadletter, metrics
from service.kafka import TopicLayoutError, ensure_topics
from service.producer import IngestProducer, Unwritable
from service.publisher import SpoolingPublisher
from service.settings import Role, Settings
from service.spool import Spool
from testkit import (
    ROOT,
    ServiceProcess,
    free_port,
    read_committed,
    settings_env,
    settings_for,
)
from tests.conftest import BOOTSTRAP

SMALL_LIMIT = 4096  # the ingest topic's max.message.bytes in these tests
KEY = b"CA" + b"7" * 40


def headers(event_id: str) -> list[tuple[str, bytes]]:
    return [("content-type", b"application/json"), ("ce_id", event_id.encode())]


def counter(metric: object) -> float:
    value: float = metric._value.get()  # type: ignore[attr-defined]
    return value


async def until(predicate: Callable[[], bool], what: str, deadline_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    while not predicate():
        assert loop.time() < give_up, what
        await asyncio.sleep(0.05)  # polling interval


async def create_ingest_topic(settings: Settings, max_message_bytes: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    settings.topic_ingest,
                    1,
                    1,
                    topic_configs={"max.message.bytes": str(max_message_bytes)},
                )
            ]
        )
    finally:
        await admin.close()


async def set_limit(topic: str, max_message_bytes: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(max_message_bytes)}
                )
            ]
        )
    finally:
        await admin.close()


@asynccontextmanager
async def publisher(
    settings: Settings,
    directory: Path,
    before_start: Callable[[Spool], list[Awaitable[None]]] | None = None,
) -> AsyncIterator[SpoolingPublisher]:
    """A spooling publisher as ingest runs it, on a real spool directory; whatever
    ``before_start`` spools is there before the producer exists."""
    spool = Spool(directory, 1 << 24)
    pub = SpoolingPublisher(IngestProducer(settings), spool, 5.0, stall_seconds=1.0)
    pub.open()
    try:
        if before_start is not None:
            for append in before_start(spool):
                await append  # one by one: the spool's order is the list's
        await pub.start()
        yield pub
    finally:
        await pub.stop()


def ingest_settings(unique: str) -> Settings:
    return settings_for(
        BOOTSTRAP,
        unique,
        role="ingest",
        topic_partitions=1,
        produce_timeout_seconds=2.0,
        produce_delivery_timeout_seconds=4.0,
    )


async def test_a_spooled_record_kafka_refuses_for_good_is_dead_lettered_and_the_drain_goes_on(
    unique: str, tmp_path: Path
) -> None:
    """Before: the big record stayed at the head of the spool for ever, and every event
    behind it with it. Now it goes to the dead-letter directory, counted and logged by
    eventId; the others reach Kafka in their order; a replay sends it once the topic
    takes it."""
    settings = ingest_settings(unique)
    await create_ingest_topic(settings, SMALL_LIMIT)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    # Random-free but incompressible enough: no codec is on, the size is the size.
    big = b'{"big":"' + b"x" * (3 * SMALL_LIMIT) + b'"}'
    spooled = [b'{"n":0}', big, b'{"n":2}', b'{"n":3}']
    refused = metrics.SPOOL_DEAD_LETTERS.labels("MessageSizeTooLargeError")
    before = counter(refused)
    directory = tmp_path / "spool"

    def fill(spool: Spool) -> list[Awaitable[None]]:
        return [spool.append(KEY, v, headers(i)) for v, i in zip(spooled, ids, strict=True)]

    with capture_logs() as logs:
        async with publisher(settings, directory, fill) as pub:
            assert pub.spool.events == 4
            await until(lambda: pub.spool.events == 0, "the spool never drained past it", 60)
            assert not pub.stalled()
    records = await read_committed(BOOTSTRAP, settings.topic_ingest, 3)
    assert [r.value for r in records] == [spooled[0], spooled[2], spooled[3]]
    assert counter(refused) == before + 1
    [line] = [e for e in logs if e["event"].startswith("kafka refuses a spooled event")]
    assert line["eventId"] == ids[1] and line["log_level"] == "error"

    # What an operator finds, in the spool's own record format: bytes, key and headers.
    [letter] = deadletter.entries(deadletter.directory_of(directory))
    assert (letter.value, letter.key, letter.headers) == (big, KEY, headers(ids[1]))
    assert letter.event_id == ids[1]
    listed = run_cli(settings, directory, "list")
    assert listed.returncode == 0 and ids[1] in listed.stdout, listed.stdout + listed.stderr

    # Still refused: the replay keeps it and says why.
    kept = run_cli(settings, directory, "replay")
    assert kept.returncode == 1 and "MessageSizeTooLarge" in kept.stderr, kept.stderr
    assert deadletter.entries(deadletter.directory_of(directory))
    # Once the topic takes it, the replay sends it and removes the file.
    await set_limit(settings.topic_ingest, 1 << 20)
    replayed = run_cli(settings, directory, "replay")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert not deadletter.entries(deadletter.directory_of(directory))
    records = await read_committed(BOOTSTRAP, settings.topic_ingest, 4)
    assert [r.value for r in records][-1] == big
    assert dict(records[-1].headers)["ce_id"] == ids[1].encode()


def run_cli(settings: Settings, spool_dir: Path, command: str) -> subprocess.CompletedProcess[str]:
    env = settings_env(settings.model_copy(update={"spool_dir": spool_dir}), free_port())
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "callstatus"), "spool", "dead-letter", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_an_event_kafka_refuses_for_good_is_refused_not_spooled(
    unique: str, tmp_path: Path
) -> None:
    """Before: the direct write's MessageSizeTooLarge sent the event to the spool and
    the caller got 202 for an event no retry could deliver."""
    settings = ingest_settings(unique)
    await create_ingest_topic(settings, SMALL_LIMIT)
    big = b'{"big":"' + b"y" * (3 * SMALL_LIMIT) + b'"}'
    async with publisher(settings, tmp_path / "spool") as pub:
        with capture_logs() as logs, pytest.raises(Unwritable) as refused:
            await pub.publish(KEY, big, headers("e-big"))
        assert refused.value.cause == "MessageSizeTooLargeError"
        assert pub.spool.events == 0 and not pub.spool.bytes
        assert any(e["event"].startswith("kafka refuses the event for good") for e in logs)
        # The producer it broke (sequence numbers) is replaced; later events get through.
        await pub.publish(KEY, b'{"n":"after"}', headers("e-after"))
        await until(lambda: pub.spool.events == 0, "the event after it never reached Kafka")
    records = await read_committed(BOOTSTRAP, settings.topic_ingest, 1)
    assert [r.value for r in records] == [b'{"n":"after"}']


async def test_start_refuses_topics_too_small_for_what_the_service_writes(
    unique: str, tmp_path: Path
) -> None:
    settings = settings_for(BOOTSTRAP, unique, role="ingest", create_topics=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        small = {"max.message.bytes": str(SMALL_LIMIT)}
        await admin.create_topics(
            [
                NewTopic(settings.topic_ingest, 1, 1, topic_configs=small),
                # No override: the broker's default (1 MiB) applies.
                NewTopic(settings.topic_changes, 1, 1),
                NewTopic(settings.topic_rejected, 1, 1),
                NewTopic(settings.topic_state, 1, 1, topic_configs={"cleanup.policy": "compact"}),
            ]
        )
    finally:
        await admin.close()
    with pytest.raises(TopicLayoutError) as refused:
        await ensure_topics(settings)
    message = str(refused.value)
    assert f"{settings.topic_ingest} takes records up to {SMALL_LIMIT} bytes" in message
    assert str(settings.producer_max_request_bytes) in message
    assert "max.message.bytes" in message and "CALLSTATUS_MAX_BODY_BYTES" in message
    assert settings.topic_changes not in message  # the broker default fits

    # Bodies of 1 MiB make records larger than the broker's default: named as such. (A
    # node running the processor checks the output topics too; ingest only its own.)
    large = settings.model_copy(update={"max_body_bytes": 1 << 20, "role": Role.ALL})
    with pytest.raises(TopicLayoutError, match=r"the broker's message\.max\.bytes"):
        await ensure_topics(large)

    # The service itself exits 3 at start, with the line in its log.
    node = ServiceProcess(settings, tmp_path, "small-topic")
    assert await asyncio.to_thread(node.wait, 90) == 3
    assert f"{settings.topic_ingest} takes records up to" in node.log_path.read_text()


async def test_topics_the_service_creates_take_its_largest_records(unique: str) -> None:
    settings = settings_for(BOOTSTRAP, unique, max_body_bytes=1 << 20)
    await ensure_topics(settings)  # creates them sized, then checks them: no error
    await ensure_topics(settings)


async def test_a_checkpoint_the_disk_refuses_is_logged_counted_retried_and_heals(
    unique: str, tmp_path: Path
) -> None:
    """Issue 16's reproduction of finding 2: `checkpoint.tmp` a directory made
    release() raise IsADirectoryError; the drain task ended with nothing logged, every
    later event was spooled behind it for ever, and readiness stayed 200. Now each
    failure is logged with its cause and counted, the release is retried with backoff,
    the node turns unready once the drain has stalled, and all of it heals by itself
    when the disk does, each event in Kafka once."""
    settings = ingest_settings(unique)
    await ensure_topics(settings)
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "checkpoint.tmp").mkdir()
    failures = metrics.SPOOL_DRAIN_ERRORS.labels("release")
    before = counter(failures)
    values = [b'{"n":%d}' % i for i in range(5)]

    def fill(spool: Spool) -> list[Awaitable[None]]:
        return [spool.append(KEY, v, headers(str(uuid.uuid4()))) for v in values]

    with capture_logs() as logs:
        async with publisher(settings, directory, fill) as pub:
            await until(lambda: counter(failures) >= before + 2, "the release was not retried")
            assert pub._drainer is not None and not pub._drainer.done()
            failed = [e for e in logs if e["event"] == "spool drain step failed; retrying"]
            assert failed[0]["stage"] == "release"
            assert "IsADirectoryError" in failed[0]["error"]
            # Events are still taken (into the spool, behind the stuck ones)...
            await pub.publish(KEY, b'{"n":"later"}', headers(str(uuid.uuid4())))
            # ...but the stalled node leaves the load balancer.
            await until(pub.stalled, "the stall never showed", 30)
            assert not await pub.ready()
            assert REGISTRY.get_sample_value("callstatus_spool_drain_stalled") == 1.0
            assert any(e["event"].startswith("spool drain stalled") for e in logs)

            (directory / "checkpoint.tmp").rmdir()  # the disk is back
            await until(lambda: pub.spool.events == 0, "the drain never recovered", 60)
            assert await pub.ready() and not pub.stalled()
    records = await read_committed(BOOTSTRAP, settings.topic_ingest, 6)
    # The acknowledged batch was released once the disk took the checkpoint, never
    # sent again meanwhile.
    assert [r.value for r in records] == [*values, b'{"n":"later"}']


async def test_a_dead_letter_whose_release_fails_is_released_again_not_sent_again(
    unique: str, tmp_path: Path
) -> None:
    """The record Kafka refuses is written as a dead letter, then the checkpoint's write
    fails. Before, the retried step read the record again and sent it again: one more
    refusal and one more producer rebuild per retry. Now the release is retried, and
    the record is refused, rebuilt for and dead-lettered exactly once."""
    settings = ingest_settings(unique)
    await create_ingest_topic(settings, SMALL_LIMIT)
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "checkpoint.tmp").mkdir()  # every release fails until it is gone
    big = b'{"big":"' + b"x" * (3 * SMALL_LIMIT) + b'"}'
    big_id = str(uuid.uuid4())
    rebuilds = metrics.PRODUCER_REBUILDS.labels("ingest", "refused_MessageSizeTooLargeError")
    release_failures = metrics.SPOOL_DRAIN_ERRORS.labels("release")
    before_rebuilds, before_failures = counter(rebuilds), counter(release_failures)

    def fill(spool: Spool) -> list[Awaitable[None]]:
        return [spool.append(KEY, big, headers(big_id))]

    async with publisher(settings, directory, fill) as pub:
        await until(
            lambda: counter(release_failures) >= before_failures + 3,
            "the dead letter's release was not retried",
        )
        assert counter(rebuilds) == before_rebuilds + 1
        (directory / "checkpoint.tmp").rmdir()  # the disk is back
        await until(lambda: pub.spool.events == 0, "the release never healed", 60)
        after = str(uuid.uuid4())
        await pub.publish(KEY, b'{"n":"after"}', headers(after))
    assert counter(rebuilds) == before_rebuilds + 1
    [letter] = deadletter.entries(deadletter.directory_of(directory))
    assert letter.event_id == big_id
    [record] = await read_committed(BOOTSTRAP, settings.topic_ingest, 1)
    assert dict(record.headers)["ce_id"] == after.encode()


async def test_records_kafka_had_stay_unsent_when_a_refusal_follows_them_after_a_crash(
    unique: str, tmp_path: Path
) -> None:
    """After a crash between a batch's ack and its checkpoint, the drain leaves out what
    Kafka has of that batch. When the rest holds a record Kafka refuses for good, the
    drain goes one record at a time to find it. Before, that cleared the list of what
    Kafka had, and those records were sent a second time; now each is in Kafka once and
    the refused one is dead-lettered."""
    settings = ingest_settings(unique)
    await create_ingest_topic(settings, SMALL_LIMIT)
    directory = tmp_path / "spool"
    big = b'{"big":"' + b"x" * (3 * SMALL_LIMIT) + b'"}'
    ids = [str(uuid.uuid4()) for _ in range(3)]
    spooled = [b'{"n":0}', big, b'{"n":2}']
    # The last run: spooled three events, noted the batch, sent it; Kafka took the two
    # it could, and the process died before the checkpoint moved.
    spool = Spool(directory, 1 << 24)
    spool.open()
    for value, event_id in zip(spooled, ids, strict=True):
        await spool.append(KEY, value, headers(event_id))
    await spool.mark_sending(spool.read(3))
    spool.close()
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
    await producer.start()
    try:
        for value, event_id in [(spooled[0], ids[0]), (spooled[2], ids[2])]:
            await producer.send_and_wait(
                settings.topic_ingest, value, key=KEY, headers=headers(event_id)
            )
    finally:
        await producer.stop()
    avoided = counter(metrics.SPOOL_RESENDS_AVOIDED)

    async with publisher(settings, directory) as pub:
        await until(lambda: pub.spool.events == 0, "the spool never drained", 60)
    records = await read_committed(BOOTSTRAP, settings.topic_ingest, 2)
    assert [dict(r.headers)["ce_id"] for r in records] == [ids[0].encode(), ids[2].encode()]
    assert counter(metrics.SPOOL_RESENDS_AVOIDED) == avoided + 2
    [letter] = deadletter.entries(deadletter.directory_of(directory))
    assert letter.event_id == ids[1]
