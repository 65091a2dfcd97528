"""Issue 16, "Disk faults", end to end on a real small file system and the real broker:
the spool's volume (a 2 MiB tmpfs) fills up mid-run while Kafka is unreachable, and is
freed again. While it is full every event is refused (Unavailable: HTTP 503) and none
is acknowledged without a durable write; once freed, events are accepted again with no
one's help; once Kafka is reachable, every acknowledged event reaches the ingest topic
exactly once, in order, and the spool drains to empty."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from service import metrics
from service.kafka import ensure_topics
from service.producer import IngestProducer, Unavailable
from service.publisher import SpoolingPublisher
from service.spool import Spool
from testkit import free_port, read_committed, settings_for
from tests.conftest import BOOTSTRAP
from tests.diskfault import fill, small_tmpfs

KEY = b"CA" + b"d1" * 20
# Larger than a page: while the disk is full, no append fits in what is left of the
# segment's last page, so every one of them meets ENOSPC.
BODY = b"z" * 6000


def event(event_id: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    value = b'{"id":"%s","pad":"%s"}' % (event_id.encode(), BODY)
    return value, [("content-type", b"application/json"), ("ce_id", event_id.encode())]


@asynccontextmanager
async def gate_to_kafka(port: int) -> AsyncIterator[None]:
    """While open, a TCP forwarder on ``port`` to the real broker; before, nothing
    listens there, so a client bootstrapping from it finds Kafka unreachable. Once
    bootstrapped, clients talk to the broker's advertised address directly."""
    host, _, broker_port = BOOTSTRAP.rpartition(":")
    pipes: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(broker_port))
        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            pipes.add(task)
            task.add_done_callback(pipes.discard)

    server = await asyncio.start_server(forward, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for task in list(pipes):
            task.cancel()
        if pipes:
            await asyncio.wait(pipes)
        await server.wait_closed()


async def until(predicate: Callable[[], bool], what: str, deadline_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    while not predicate():
        assert loop.time() < give_up, what
        await asyncio.sleep(0.05)  # polling interval, with a deadline


async def test_a_full_spool_disk_answers_503_then_heals_and_every_202_reaches_kafka_once(
    unique: str, tmp_path: Path
) -> None:
    gate = free_port()
    settings = settings_for(
        f"127.0.0.1:{gate}",
        unique,
        role="ingest",
        topic_partitions=1,
        produce_timeout_seconds=2.0,
        produce_delivery_timeout_seconds=4.0,
    )
    await ensure_topics(settings.model_copy(update={"kafka_bootstrap_servers": BOOTSTRAP}))
    with small_tmpfs(tmp_path / "disk") as disk:
        directory = disk / "spool"
        # The spool's own cap is far above the volume: the disk fills first.
        spool = Spool(directory, 1 << 26)
        pub = SpoolingPublisher(IngestProducer(settings), spool, 5.0)
        pub.open()
        acknowledged: list[str] = []
        refused: list[str] = []
        reasons: set[str] = set()

        async def send(n: int) -> None:
            for _ in range(n):
                event_id = str(uuid.uuid4())
                value, headers = event(event_id)
                try:
                    await pub.publish(KEY, value, headers)
                except Unavailable as exc:
                    refused.append(event_id)
                    reasons.add(exc.reason)
                else:
                    acknowledged.append(event_id)

        try:
            # Kafka is unreachable for real: nothing listens where the producer looks.
            with pytest.raises(Exception):  # noqa: B017 (aiokafka's connection error)
                await asyncio.wait_for(pub.start(), 30)
            await send(20)
            assert len(acknowledged) == 20 and not refused and spool.events == 20

            # The volume fills up mid-run.
            filler = await asyncio.to_thread(fill, disk)
            on_disk = spool.bytes
            full_errors = metrics.SPOOL_DISK_ERRORS.labels("write", "ENOSPC")._value.get()
            await send(30)
            assert len(refused) == 30 and len(acknowledged) == 20, "a 202 without a write"
            assert reasons == {"spool_error"}  # HTTP 503 with Retry-After (service/app.py)
            assert spool.events == 20 and spool.bytes == on_disk
            assert metrics.SPOOL_DISK_ERRORS.labels("write", "ENOSPC")._value.get() > full_errors

            # Freed: accepted again, with no restart and no operator.
            filler.unlink()
            await send(20)
            assert len(acknowledged) == 40 and len(refused) == 30 and spool.events == 40

            # Kafka becomes reachable; the node connects (as server.Node does, by retrying
            # start) and the drainer sends everything spooled.
            async with gate_to_kafka(gate):
                loop = asyncio.get_running_loop()
                give_up = loop.time() + 60
                while True:
                    try:
                        await asyncio.wait_for(pub.start(), 30)
                        break
                    except Exception:  # not yet reachable from aiokafka's view
                        assert loop.time() < give_up, "the producer never connected"
                        await asyncio.sleep(0.2)  # retry interval, with a deadline
                await until(lambda: spool.events == 0 and spool.empty.is_set(), "never drained")
                await send(10)
                assert len(acknowledged) == 50 and len(refused) == 30
                await until(lambda: spool.events == 0, "the last events never left the spool")
                records = await read_committed(BOOTSTRAP, settings.topic_ingest, 50)
        finally:
            with contextlib.suppress(Exception):
                await pub.stop()

        ids = [dict(r.headers)["ce_id"].decode() for r in records]
        # Every acknowledged event exactly once, in the order acknowledged (one call,
        # one partition); nothing refused slipped through from a half-written group.
        assert ids == acknowledged
        assert not set(refused) & set(ids)
        # And the spool on disk is empty: a restart finds nothing to send again.
        again = Spool(directory, 1 << 26)
        again.open()
        assert again.events == 0 and not again.read(10)
        again.close()
