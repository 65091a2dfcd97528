"""The service's Kafka principals against a broker that enforces ACLs (issue 17).

The launcher's authorizer mode (KAFKA_SASL_USERS: SCRAM-SHA-512 and KRaft's
StandardAuthorizer, nothing allowed without an ACL) runs a private broker; the ACLs
granted are exactly service/acls.py's, applied with ``deploy/local/kafka acl``, the same
list the prod overlay's KafkaUsers carry (tests/test_deploy.py). The service logs in with
passwords read from files, as from a mounted Secret. Proven here: ingest and processor
work end to end with their own users and the start-up checks pass under least
privilege; ingest can neither write changes nor read any topic but its own (which it
reads only for the spool's check after an unclean stop); a user without ACLs
cannot write ingest; the example consumer reads changes but cannot write ingest; the
processor's transactions are held to its prefix.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from structlog.testing import capture_logs

from service.acls import (
    CONSUMER_GROUP_PREFIX,
    CONSUMER_USER,
    INGEST_USER,
    PROCESSOR_USER,
    Pattern,
    acl_command_args,
    principals,
)
from service.app import create_app
from service.kafka import ensure_topics
from service.processor import Processor
from service.producer import IngestProducer
from service.settings import Settings
from service.worker import open_producer
from testkit import LAUNCHER, kafka, settings_for

# A port of this test's own (the shared broker is on 9092, other tests' on others).
PORT = 20620
ADMIN = "admin"
NOBODY = "nobody"  # a valid login that no ACL names
USERS = {
    ADMIN: "admin-pw",
    INGEST_USER: "ingest-pw",
    PROCESSOR_USER: "processor-pw",
    CONSUMER_USER: "consumer-pw",
    NOBODY: "nobody-pw",
}
PARTITIONS = 2
BODY = b'{"requestType":"callStatus","callId":"CA' + b"7" * 40 + b'","callStatus":"queued"}'
DEADLINE_S = 60.0


@dataclass(frozen=True)
class Secured:
    """The authorizer-mode broker, the names its ACLs were granted for, and a password
    file per user."""

    env: dict[str, str]
    address: str
    unique: str
    passwords: dict[str, Path]

    def settings(self, user: str, role: str = "processor") -> Settings:
        return settings_for(
            self.address,
            self.unique,
            role=role,
            create_topics=False,  # as in prod: topics are the admin's (Strimzi's) business
            topic_partitions=PARTITIONS,
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username=user,
            kafka_sasl_password_file=self.passwords[user],
        )

    def options(self, user: str) -> dict[str, object]:
        return {
            "bootstrap_servers": self.address,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": user,
            "sasl_plain_password": USERS[user],
            "request_timeout_ms": 10_000,
        }


def launcher(env: dict[str, str], *args: str) -> str:
    """``deploy/local/kafka ARGS``; its whole stdout."""
    result = subprocess.run(
        [str(LAUNCHER), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"kafka {' '.join(args[:2])} failed: {result.stderr[-2000:]}"
    return result.stdout


def expected_bindings(settings: Settings) -> set[tuple[str, str, str, str, str]]:
    """service/acls.py's ACLs as the ACL tool lists them: (principal, resource type,
    name, pattern type, operation), in Kafka's upper-case names."""
    out = set()
    for user, acls in principals(settings).items():
        for acl in acls:
            kind = re.sub(r"(?<!^)(?=[A-Z])", "_", str(acl.resource)).upper()
            pattern = "PREFIXED" if acl.pattern is Pattern.PREFIX else "LITERAL"
            for op in acl.operations:
                operation = re.sub(r"(?<!^)(?=[A-Z])", "_", op).upper()
                out.add((f"User:{user}", kind, acl.name, pattern, operation))
    return out


def listed_bindings(listing: str) -> set[tuple[str, str, str, str, str]]:
    """Parse ``kafka-acls --list``: a resource line, then one line per ACL on it."""
    out = set()
    resource: tuple[str, str, str] | None = None
    for line in listing.splitlines():
        found = re.search(r"resourceType=(\w+), name=(.*), patternType=(\w+)\)", line)
        if found:
            kind, name, pattern = found.groups()
            resource = (kind, name, pattern)
            continue
        acl = re.search(r"principal=([^,]+), host=\*, operation=(\w+), permissionType=ALLOW", line)
        if acl and resource is not None:
            out.add((acl.group(1), resource[0], resource[1], resource[2], acl.group(2)))
    return out


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    folder = tmp_path_factory.mktemp("acls")
    env = {
        "KAFKA_PORT": str(PORT),
        "KAFKA_CONTROLLER_PORT": str(PORT + 1),
        "KAFKA_DATA_DIR": str(folder / "kafka"),
        # The first user is the broker's own and the only super user.
        "KAFKA_SASL_USERS": ",".join(f"{user}:{pw}" for user, pw in USERS.items()),
    }
    address = kafka("up", env)
    try:
        passwords = {}
        for user, password in USERS.items():
            path = folder / f"{user}.password"
            path.write_text(password)  # a Secret's key mounted as a file: no newline
            passwords[user] = path
        unique = uuid.uuid4().hex[:10]
        setup = Secured(env, address, unique, passwords)
        acls = principals(setup.settings(PROCESSOR_USER))
        for user, granted in acls.items():
            for acl in granted:
                launcher(env, "acl", *acl_command_args(user, acl))
        # The broker answers ACL listings from the metadata it has applied: once every
        # binding shows there, it is also what the broker enforces.
        wanted = expected_bindings(setup.settings(PROCESSOR_USER))
        give_up = time.monotonic() + DEADLINE_S
        while (listed := listed_bindings(launcher(env, "acl", "--list"))) != wanted:
            assert time.monotonic() < give_up, f"ACLs differ: {listed ^ wanted}"
            time.sleep(0.2)  # polling interval
        yield setup
    finally:
        kafka("down", env)


@pytest.fixture
async def topics(secured: Secured) -> Secured:
    """The four topics, created by the admin (in prod Strimzi's Topic Operator does it):
    no service user may create topics."""
    s = secured.settings(PROCESSOR_USER)
    admin = AIOKafkaAdminClient(**secured.options(ADMIN))
    await admin.start()
    try:
        configs = {s.topic_state: {"cleanup.policy": "compact"}}
        await admin.create_topics(
            [NewTopic(n, PARTITIONS, 1, topic_configs=configs.get(n, {})) for n in s.topic_names]
        )
    except TopicAlreadyExistsError:
        pass  # an earlier test of this module made them
    finally:
        await admin.close()
    return secured


def test_the_broker_enforces_exactly_the_acls_of_service_acls(secured: Secured) -> None:
    # The fixture waited for this; stated here as the claim it is: the local authorizer
    # mode grants what the manifests grant, from the one definition.
    listing = launcher(secured.env, "acl", "--list")
    assert listed_bindings(listing) == expected_bindings(secured.settings(PROCESSOR_USER))


async def test_ingest_and_processor_work_with_their_own_users(topics: Secured) -> None:
    ingest = topics.settings(INGEST_USER, role="ingest")
    processor_settings = topics.settings(PROCESSOR_USER)
    # The password came from its file, as from a mounted Secret.
    assert ingest.kafka_sasl_password is not None
    assert ingest.kafka_sasl_password.get_secret_value() == USERS[INGEST_USER]
    # Each stage's start checks pass under least privilege: partition counts and
    # max.message.bytes of its own topics, nothing left unchecked for want of a grant.
    with capture_logs() as logs:
        assert await ensure_topics(ingest) == {ingest.topic_ingest: PARTITIONS}
        assert set(await ensure_topics(processor_settings)) == set(ingest.topic_names)
    assert not [entry for entry in logs if entry["log_level"] == "warning"], logs

    producer = IngestProducer(ingest)
    await producer.start()
    processor = Processor(processor_settings)
    task = asyncio.create_task(processor.run())
    try:
        app = create_app(ingest, producer)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            response = await client.post(
                "/v1/call-status", content=BODY, headers={"content-type": "application/json"}
            )
        assert response.status_code == 202, response.text
        event_id = response.json()["eventId"]
        # The spool's check after an unclean stop reads the ingest topic as ingest.
        sent_at_ms = int(time.time() * 1000) - 60_000
        assert await producer.written({event_id}, sent_at_ms) == {event_id}

        # The example consumer reads the change, in a group of its prefix.
        consumer = AIOKafkaConsumer(
            ingest.topic_changes,
            **topics.options(CONSUMER_USER),
            group_id=f"{CONSUMER_GROUP_PREFIX}.test-{topics.unique}",
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            loop = asyncio.get_running_loop()
            give_up = loop.time() + DEADLINE_S
            seen: list[str] = []
            while not seen:
                assert loop.time() < give_up, "no change arrived with the service's own users"
                assert not task.done(), f"the processor stopped: {task}"
                for records in (await consumer.getmany(timeout_ms=250)).values():
                    values = [json.loads(r.value or b"") for r in records]
                    seen += [v["eventId"] for v in values if "probe" not in v]
        finally:
            await consumer.stop()
        assert seen == [event_id]
    finally:
        await processor.stop()
        await asyncio.wait_for(task, 60)
        await producer.stop()


async def read_one(options: dict[str, object], topic: str) -> bytes | None:
    """The first record of partition 0 of ``topic``, fetched without a group as any
    reader could. A refusal is raised (aiokafka raises it from a later poll than the
    fetch it came with, hence the loop); nothing there by the deadline fails the test."""
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + DEADLINE_S
        while loop.time() < give_up:
            for records in (await consumer.getmany(tp, timeout_ms=250)).values():
                if records:
                    value: bytes | None = records[0].value
                    return value
        raise AssertionError(f"nothing readable on {topic} within {DEADLINE_S} s")
    finally:
        await consumer.stop()


async def assert_may_not_read(options: dict[str, object], topic: str) -> None:
    """The user cannot read ``topic``. Read implies Describe in Kafka, so a topic the
    user may not even Describe (metadata says "not authorized") is unreadable for it;
    one it may Describe must refuse the fetch itself."""
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"] == TopicAuthorizationFailedError.errno:
        return
    assert described["error_code"] == 0, described
    with pytest.raises(TopicAuthorizationFailedError):
        await read_one(options, topic)


async def probe(secured: Secured, topic: str) -> bytes:
    """Write a record to partition 0 of ``topic`` as the admin, so that a read of it can
    succeed visibly. Not an event: readers of changes look for eventIds only."""
    value = json.dumps({"probe": uuid.uuid4().hex}).encode()
    producer = AIOKafkaProducer(**secured.options(ADMIN), acks="all")
    try:
        await producer.start()
        await producer.send_and_wait(topic, value, key=b"probe", partition=0)
    finally:
        await producer.stop()
    return value


async def write_one(options: dict[str, object], topic: str, idempotent: bool = False) -> None:
    producer = AIOKafkaProducer(**options, enable_idempotence=idempotent, acks="all")
    try:
        await producer.start()
        await asyncio.wait_for(producer.send_and_wait(topic, b"forged", key=b"CA1"), 30)
    finally:
        await producer.stop()


async def test_ingest_may_not_write_changes_nor_read_other_topics(topics: Secured) -> None:
    s = topics.settings(INGEST_USER, role="ingest")
    options = topics.options(INGEST_USER)
    await write_one(options, s.topic_ingest, idempotent=True)  # what it is there for
    for topic in (s.topic_changes, s.topic_rejected, s.topic_state):
        with pytest.raises(TopicAuthorizationFailedError):
            await write_one(options, topic, idempotent=True)
    for topic in (s.topic_changes, s.topic_rejected, s.topic_state):
        await probe(topics, topic)  # something there to read
        await assert_may_not_read(options, topic)
    # Its own topic only, what it wrote itself (the spool's check after a crash).
    await probe(topics, s.topic_ingest)
    assert await read_one(options, s.topic_ingest) is not None


async def test_a_user_without_acls_may_not_write_ingest(topics: Secured) -> None:
    s = topics.settings(PROCESSOR_USER)
    options = topics.options(NOBODY)
    with pytest.raises(TopicAuthorizationFailedError):
        await write_one(options, s.topic_ingest)
    # The idempotent producer ingest uses is refused its producer id already: it may
    # write no topic at all.
    with pytest.raises(ClusterAuthorizationFailedError):
        await write_one(options, s.topic_ingest, idempotent=True)


async def test_the_consumer_may_read_changes_but_not_write_ingest(topics: Secured) -> None:
    s = topics.settings(PROCESSOR_USER)
    options = topics.options(CONSUMER_USER)
    for topic in (s.topic_changes, s.topic_rejected):
        written = await probe(topics, topic)
        # The first record of the partition: this probe, or one written before it.
        assert await read_one(options, topic) is not None, written
    with pytest.raises(TopicAuthorizationFailedError):
        await write_one(options, s.topic_ingest)
    for topic in (s.topic_ingest, s.topic_state):
        await probe(topics, topic)
        await assert_may_not_read(options, topic)


async def test_the_processor_may_use_only_its_own_transactional_ids(topics: Secured) -> None:
    s = topics.settings(PROCESSOR_USER)
    options = topics.options(PROCESSOR_USER)
    producer = await open_producer(options, f"{s.consumer_group}.{s.topic_ingest}.0")
    await producer.stop()
    with pytest.raises(TransactionalIdAuthorizationFailed):
        await open_producer(options, f"someone-else.{s.topic_ingest}.0")
    with pytest.raises(TopicAuthorizationFailedError):
        await write_one(options, s.topic_ingest)
