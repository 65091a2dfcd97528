"""Small helpers for the integration tests: topics, producing ingest events, reading
committed output with a deadline, and the expected outcome computed by the pure FSM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import tempfile
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from schemas.call import Call, CallStatus
from schemas.messages import RejectReason, Source, encode_ingest
from service.fsm import CallState, Outcome, decide
from service.kafka import partition_counts
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "deploy" / "local" / "kafka"


def kafka(command: str, env: dict[str, str] | None = None) -> str:
    """Run the project's own launcher; returns its last stdout line."""
    result = subprocess.run(
        [str(LAUNCHER), command],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode not in (0, 3):
        raise RuntimeError(f"kafka {command} failed: {result.stderr[-2000:]}")
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


@asynccontextmanager
async def private_broker(port: int, **extra_env: str) -> AsyncIterator[dict[str, str]]:
    """A broker of a test's own, started by the project's launcher on ``port`` with a
    throw-away data dir, so the test may stop and restart it without disturbing others.
    Yields the launcher environment plus ``address``."""
    with tempfile.TemporaryDirectory(prefix="callstatus-kafka-") as data:
        env = {
            "KAFKA_PORT": str(port),
            "KAFKA_CONTROLLER_PORT": str(port + 1),
            "KAFKA_DATA_DIR": str(Path(data) / "kafka"),
            **extra_env,
        }
        address = await asyncio.to_thread(kafka, "up", env)
        try:
            yield {**env, "address": address}
        finally:
            await asyncio.to_thread(kafka, "down", env)


async def create_topics(
    bootstrap: str, names: Sequence[str], partitions: int, compact: Iterable[str] = ()
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        compacted = set(compact)
        await admin.create_topics(
            [
                NewTopic(
                    n,
                    partitions,
                    1,
                    topic_configs={"cleanup.policy": "compact"} if n in compacted else {},
                )
                for n in names
            ]
        )
    finally:
        await admin.close()


@dataclass(frozen=True)
class Event:
    event_id: str
    call: Call
    source: Source = Source.RESOURCE
    received_at: datetime | None = None  # None: when produced


def make_call(
    call_id: str, status: CallStatus, revision: int | None = None, **fields: object
) -> Call:
    return Call.model_validate(
        {"callId": call_id, "status": status, "revision": revision, **fields}
    )


def traceparent(event_id: str) -> bytes:
    """A W3C traceparent derived from the event id, to follow it through the processor."""
    return f"00-{uuid.UUID(event_id).hex}-00f067aa0ba902b7-01".encode()


async def produce(
    bootstrap: str, topic: str, events: Sequence[Event], compression: str | None = None
) -> None:
    """Write events to the ingest topic as the ingest stage does: keyed by callId,
    acks=all, idempotent, so per-call order is the list order."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        compression_type=compression,
    )
    try:
        await producer.start()  # inside: a start that fails must close the producer too
        futures = []
        for e in events:
            received = e.received_at or datetime.now(UTC)
            value = encode_ingest(e.event_id, received, e.source, None, e.call, e.call.to_json())
            headers = [("traceparent", traceparent(e.event_id))]
            futures.append(
                await producer.send(topic, value=value, key=e.call.callId.encode(), headers=headers)
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def partitions_of(bootstrap: str, topic: str, give_up: float) -> list[TopicPartition]:
    """The topic's partitions, once the cluster reports them."""
    loop = asyncio.get_running_loop()
    while True:
        count = (await partition_counts({"bootstrap_servers": bootstrap}, [topic])).get(topic, 0)
        if count:
            return [TopicPartition(topic, p) for p in range(count)]
        if loop.time() > give_up:
            raise TimeoutError(f"no metadata for {topic}")
        await asyncio.sleep(0.2)  # polling interval, not synchronisation


async def read_committed(
    bootstrap: str,
    topic: str,
    expected: int | Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    deadline_s: float = 120.0,
    settle_s: float = 2.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``topic`` from the start with read_committed until ``expected`` records are
    in (or, given a predicate, until it holds for what was read), then keep polling
    ``settle_s`` longer so extra (duplicate) records would show. At the deadline it
    returns what it has, for the caller's assertions to judge."""
    enough = expected if callable(expected) else (lambda out: len(out) >= expected)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline_s
        tps = await partitions_of(bootstrap, topic, give_up)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        settle_until: float | None = None
        while loop.time() < give_up:
            if enough(out):
                settle_until = settle_until or loop.time() + settle_s
                if loop.time() >= settle_until:
                    break
            batches = await consumer.getmany(timeout_ms=250)
            for records in batches.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


@dataclass
class Expected:
    changes: dict[str, list[str]]  # callId -> accepted eventIds in order
    rejected: dict[str, list[tuple[str, RejectReason]]]


def expected_outcomes(events: Sequence[Event]) -> Expected:
    """Run the pure FSM over each call's events in production order."""
    states: dict[str, CallState | None] = defaultdict(lambda: None)
    changes: dict[str, list[str]] = defaultdict(list)
    rejected: dict[str, list[tuple[str, RejectReason]]] = defaultdict(list)
    now = datetime.now(UTC)
    for e in events:
        cid = e.call.callId
        d = decide(states[cid], e.call, e.event_id, now)
        states[cid] = d.state
        if d.outcome is Outcome.ACCEPTED:
            changes[cid].append(e.event_id)
        elif d.outcome is Outcome.REJECTED:
            assert d.reason is not None
            rejected[cid].append((e.event_id, d.reason))
    return Expected(dict(changes), dict(rejected))


def by_call(
    records: Iterable[ConsumerRecord[bytes, bytes]], field: str = "eventId"
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = json.loads(r.value or b"{}")
        out[value["callId"]].append(value[field])
    return dict(out)


def settings_for(bootstrap: str, unique: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "kafka_bootstrap_servers": bootstrap,
        "verify_signatures": False,
        "role": "processor",
        "topic_ingest": f"t-{unique}.ingest",
        "topic_changes": f"t-{unique}.changes",
        "topic_rejected": f"t-{unique}.rejected",
        "topic_state": f"t-{unique}.state",
        "consumer_group": f"g-{unique}",
        "log_format": "console",
    }
    values.update(overrides)
    return Settings.model_validate(values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def settings_env(settings: Settings, port: int) -> dict[str, str]:
    """The environment that makes ``callstatus serve`` run with these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTATUS_")}
    env.update(
        CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        CALLSTATUS_ROLE=settings.role.value,
        CALLSTATUS_VERIFY_SIGNATURES=str(settings.verify_signatures).lower(),
        CALLSTATUS_SIGNING_SECRETS=",".join(s.get_secret_value() for s in settings.signing_secrets),
        CALLSTATUS_TOPIC_INGEST=settings.topic_ingest,
        CALLSTATUS_TOPIC_CHANGES=settings.topic_changes,
        CALLSTATUS_TOPIC_REJECTED=settings.topic_rejected,
        CALLSTATUS_TOPIC_STATE=settings.topic_state,
        CALLSTATUS_TOPIC_PARTITIONS=str(settings.topic_partitions),
        CALLSTATUS_CREATE_TOPICS=str(settings.create_topics).lower(),
        CALLSTATUS_CONSUMER_GROUP=settings.consumer_group,
        CALLSTATUS_PROCESSOR_BATCH_MAX=str(settings.processor_batch_max),
        CALLSTATUS_PRODUCE_TIMEOUT_SECONDS=str(settings.produce_timeout_seconds),
        CALLSTATUS_PRODUCE_DELIVERY_TIMEOUT_SECONDS=str(settings.produce_delivery_timeout_seconds),
        CALLSTATUS_SPOOL_ENABLED=str(settings.spool_enabled).lower(),
        # Relative paths resolve in the process's working directory (its log folder).
        CALLSTATUS_SPOOL_DIR=str(settings.spool_dir),
        CALLSTATUS_MAX_CONNECTIONS=str(settings.max_connections),
        CALLSTATUS_HEADER_TIMEOUT_SECONDS=str(settings.header_timeout_seconds),
        CALLSTATUS_MAX_HEADER_BYTES=str(settings.max_header_bytes),
        CALLSTATUS_MAX_HEADER_FIELDS=str(settings.max_header_fields),
        CALLSTATUS_HOST="127.0.0.1",
        CALLSTATUS_PORT=str(port),
        CALLSTATUS_LOG_FORMAT="json",
        CALLSTATUS_DRAIN_DELAY_SECONDS=str(settings.drain_delay_seconds),
        CALLSTATUS_SHUTDOWN_GRACE_SECONDS=str(settings.shutdown_grace_seconds),
    )
    return env


class ServiceProcess:
    """``callstatus serve`` as a real child process, as it runs in production."""

    def __init__(self, settings: Settings, log_dir: Path, name: str) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "callstatus"), "serve"],
            env=settings_env(settings, self.port),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=log_dir,  # no .callstatus.env there: the environment alone configures it
        )

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code

    def terminate(self, timeout: float = 60) -> bool:
        """SIGTERM, wait, and report whether the process shut down cleanly (uvicorn
        re-raises the signal after its graceful shutdown, so the exit code is -15).
        A process still running after ``timeout`` is killed and reported unclean."""
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            return False
        finally:
            self._log.close()
        clean_exit = code in (0, -signal.SIGTERM)
        return clean_exit and self.logged("stopped")

    def logged(self, event: str) -> bool:
        """Whether the process wrote a JSON log line with this event."""
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("event") == event:
                return True
        return False

    async def wait_ready(self, deadline_s: float = 60) -> None:
        """Poll /readyz until the node says it is ready (for a processor: partitions
        assigned and restored)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline_s
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            while True:
                assert self.alive(), (
                    f"{self.log_path.name} exited: {self.log_path.read_text()[-3000:]}"
                )
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                assert loop.time() < give_up, f"{self.log_path.name} never became ready"
                await asyncio.sleep(0.2)  # polling interval

    def alive(self) -> bool:
        return self.proc.poll() is None


def kafka_cluster(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the launcher's cluster mode (``deploy/local/kafka cluster ARGS``); returns
    its last stdout line. Exit 3 ("stopped", "degraded", no leader) is an answer."""
    result = subprocess.run(
        [str(LAUNCHER), "cluster", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode not in (0, 3):
        raise RuntimeError(f"kafka cluster {' '.join(args)} failed: {result.stderr[-2000:]}")
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class PartitionState:
    leader: int  # node id, -1 while there is none
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass(frozen=True)
class Cluster:
    """A multi-node cluster started by the launcher: its environment (ports, data
    folder), the bootstrap list, and ways to crash, restart and question its nodes."""

    env: dict[str, str]
    bootstrap: str
    nodes: int

    def pid(self, node: int) -> int | None:
        """Node ``node``'s broker pid as the launcher recorded it (None: not running)."""
        pid_file = Path(self.env["KAFKA_CLUSTER_DATA_DIR"], f"node-{node}", "kafka.pid")
        try:
            return int(pid_file.read_text().strip())
        except FileNotFoundError:
            return None

    async def kill(self, node: int) -> None:
        """SIGKILL the node (the launcher returns once the process is gone)."""
        await asyncio.to_thread(kafka_cluster, "kill", str(node), env=self.env)

    async def start(self, node: int) -> None:
        """Start the node again; returns once the cluster lists it as a live broker."""
        await asyncio.to_thread(kafka_cluster, "start", str(node), env=self.env)

    async def leader(self, topic: str, partition: int) -> int:
        """The id of the partition's leader in the cluster's metadata now (-1: none)."""
        state = (await self.partitions(topic)).get(partition)
        return state.leader if state else -1

    async def partitions(self, topic: str) -> dict[int, PartitionState]:
        """Leader, replicas and in-sync replicas of each partition of ``topic``, asked
        through aiokafka's admin client (a metadata request to a live node)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            described = await admin.describe_topics([topic])
        finally:
            await admin.close()
        return {
            p["partition"]: PartitionState(p["leader"], tuple(p["replicas"]), tuple(p["isr"]))
            for t in described
            if t["topic"] == topic and t["error_code"] == 0
            for p in t["partitions"]
        }

    async def new_leader(self, topic: str, partition: int, old: int, deadline_s: float) -> int:
        """Poll until the partition is led by a node other than ``old`` (the controller
        moves leadership once it has declared ``old`` dead); returns the new leader."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline_s
        while True:
            try:
                leader = await self.leader(topic, partition)
            except KafkaError:
                leader = -1  # the admin client reached no node this time: ask again
            if leader not in (-1, old):
                return leader
            if loop.time() > give_up:
                raise TimeoutError(f"{topic}-{partition} still led by {leader} (old {old})")
            await asyncio.sleep(0.2)  # polling interval, not synchronisation


@asynccontextmanager
async def private_cluster(
    base_port: int, brokers: int = 3, **extra_env: str
) -> AsyncIterator[Cluster]:
    """A cluster of a test's own, started by the project's launcher (``kafka cluster
    up``) with node N on ports ``base_port + 2(N-1)`` (client) and the one above
    (controller), in a throw-away data dir; stopped again at the end, whatever state
    the test left its nodes in."""
    with tempfile.TemporaryDirectory(prefix="callstatus-kafka-cluster-") as data:
        env = {
            "KAFKA_CLUSTER_PORT": str(base_port),
            "KAFKA_CLUSTER_NODES": str(brokers),
            "KAFKA_CLUSTER_DATA_DIR": str(Path(data) / "cluster"),
            **extra_env,
        }
        try:
            bootstrap = await asyncio.to_thread(kafka_cluster, "up", env=env)
            yield Cluster(env, bootstrap, brokers)
        finally:
            # Also after a failed `up`: it stops what it started, but a node that had
            # started and then timed out elsewhere must not outlive the test.
            await asyncio.to_thread(kafka_cluster, "down", env=env)
