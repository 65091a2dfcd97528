"""The spool's dead-letter directory: spooled events Kafka refuses for good.

An event answered 202 from the spool that Kafka then refuses whatever we retry (larger
than the topic's ``max.message.bytes``, a timestamp or a policy it refuses) must neither
block the events behind it nor vanish. The drainer writes it here and goes on; an
operator lists it, fixes the cause (usually the topic's ``max.message.bytes``) and
replays it: ``callstatus spool dead-letter list`` and ``... replay``.

Format: ``<spool dir>/dead-letter/<received_ms>_<eventId>_<kafka error>.rec``, one file
per event, holding exactly one record in the spool's own format (``service/spoolformat.py``:
crc32, length, received time, key, headers, value): the bytes, key and headers the
event was spooled with, so a replay sends what ingest would have sent. Written aside,
fsync'd and renamed before the drainer releases the event from the spool: a crash in
between writes the same file again (same name), never loses the event.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer

from service.headers import event_id_of
from service.kafka import client_options
from service.partitioner import partition_for
from service.settings import Settings
from service.spoolfiles import fsync_dir
from service.spoolformat import SpooledRecord, decode, encode

DIRECTORY = "dead-letter"
SUFFIX = ".rec"
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    path: Path
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    received_ms: int

    @property
    def event_id(self) -> str | None:
        return event_id_of(self.headers)


def directory_of(spool_dir: Path) -> Path:
    return spool_dir / DIRECTORY


def write(directory: Path, record: SpooledRecord, reason: str) -> Path:
    """Make ``record`` durable in ``directory`` (blocking: call it in a thread)."""
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)  # the directory's own name must survive a crash
    event = _UNSAFE.sub("_", event_id_of(record.headers) or "no-event-id")
    name = f"{record.received_ms:013d}_{event}_{_UNSAFE.sub('_', reason)}{SUFFIX}"
    path = directory / name
    tmp = directory / (name + ".tmp")
    data = encode(record.key, record.value, record.headers, record.received_ms)
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(directory)
    return path


def entries(directory: Path) -> list[DeadLetter]:
    """Every dead letter in ``directory``, oldest first. A file that does not hold one
    whole record raises ValueError naming it: never guess at a damaged event."""
    out = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        data = path.read_bytes()
        record = decode(data, 0)
        if record is None or record[4] != len(data):
            raise ValueError(f"{path} is not one whole spool record")
        key, value, headers, received_ms, _ = record
        out.append(DeadLetter(path, key, value, headers, received_ms))
    return out


async def replay(settings: Settings, directory: Path) -> list[tuple[DeadLetter, str | None]]:
    """Send each dead letter to the ingest topic, as ingest does (acks=all, idempotent,
    the same partitioner), one at a time in order, and delete its file once Kafka
    acknowledged it. Returns each letter with the error that kept it (None: sent)."""
    producer = AIOKafkaProducer(
        **client_options(settings),
        acks="all",
        enable_idempotence=True,
        partitioner=partition_for,
        max_request_size=settings.producer_max_request_bytes,
    )
    await producer.start()
    results: list[tuple[DeadLetter, str | None]] = []
    try:
        for letter in entries(directory):
            try:
                await producer.send_and_wait(
                    settings.topic_ingest,
                    value=letter.value,
                    key=letter.key,
                    headers=letter.headers,
                )
            except Exception as exc:  # reported per letter; the file stays for later
                results.append((letter, repr(exc)))
                # A refused batch leaves the producer's sequence numbers unusable for
                # that partition: the remaining letters wait for the next replay.
                break
            letter.path.unlink()
            results.append((letter, None))
    finally:
        await producer.stop()
    return results
