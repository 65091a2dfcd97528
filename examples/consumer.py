"""A downstream consumer of the ``changes`` topic, written the way the topic needs it.

Copy it into your own service; it needs only ``aiokafka`` and ``jsonschema`` (and the
published schema file ``schemas/changes.schema.json``). What it does, and why:

- **read_committed**: the processor publishes each batch of changes in a Kafka
  transaction. A transaction it aborted (a crash, a rebalance) leaves records in the
  log that a ``read_uncommitted`` consumer (aiokafka's default!) would hand you; with
  ``read_committed`` you only see changes that really happened, exactly once.
- **Deduplication on eventId**: this consumer commits its offsets *after* handling a
  batch, so after a crash or a rebalance it reads again what it handled but had not
  committed (at-least-once towards your handler). Each change carries an ``eventId`` that
  never changes downstream; a change whose ``eventId`` was handled already is skipped.
  The example keeps the ids in a bounded in-memory set; a real consumer keeps them where
  its results go (a unique key in the same database transaction), so that skipping
  survives restarts too.
- **Validation against the published JSON Schema**: a message that does not match is
  not handed to your code; it is counted and logged with its position, and reading goes
  on (one bad record must not block a partition).
- **Order**: changes are keyed by ``callId``, so one call's changes are in one partition,
  in order. The handler sees them in that order; do not reorder them per call.

Run it against a broker (Ctrl-C stops it)::

    python -m examples.consumer --bootstrap 127.0.0.1:9092 \\
        --topic freeclimb.call-status.changes --group my-team-billing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from jsonschema import Draft202012Validator

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "changes.schema.json"
log = logging.getLogger("changes-consumer")

Change = dict[str, Any]
Handler = Callable[[Change], Awaitable[None]]


class SeenEvents:
    """The eventIds handled most recently, at most ``capacity`` of them (oldest go first).
    Replace it with a store that survives restarts: see the module's docstring."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


@dataclass
class Counts:
    handled: int = 0
    duplicates: int = 0
    invalid: int = 0


class ChangesConsumer:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        handler: Handler,
        seen: SeenEvents | None = None,
        schema_path: Path = SCHEMA,
    ) -> None:
        self.topic = topic
        self.handler = handler
        self.seen = seen if seen is not None else SeenEvents()
        self.counts = Counts()
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
        Draft202012Validator.check_schema(schema)
        self.validator = Draft202012Validator(schema)
        self.consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            isolation_level="read_committed",  # never an aborted change
            enable_auto_commit=False,  # commit after handling, below
            auto_offset_reset="earliest",  # a new group starts at the oldest change
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Handle changes until ``stop`` is set; offsets are committed after each batch."""
        await self.consumer.start()
        try:
            while not stop.is_set():
                batches = await self.consumer.getmany(timeout_ms=500, max_records=500)
                for records in batches.values():
                    for record in records:
                        await self._one(record.value or b"", record.partition, record.offset)
                if batches:
                    await self.consumer.commit()
        finally:
            await self.consumer.stop()

    async def _one(self, value: bytes, partition: int, offset: int) -> None:
        try:
            change = json.loads(value)
        except ValueError:
            change = None
        errors = [] if change is None else list(self.validator.iter_errors(change))
        if change is None or errors:
            self.counts.invalid += 1
            why = errors[0].message if errors else "not JSON"
            log.error("invalid change skipped at %s-%d@%d: %s", self.topic, partition, offset, why)
            return
        event_id = change["eventId"]
        if event_id in self.seen:
            self.counts.duplicates += 1  # handled before a restart or rebalance
            return
        await self.handler(change)
        self.seen.add(event_id)
        self.counts.handled += 1


async def print_change(change: Change) -> None:
    before = change["previousStatus"] or "(new)"
    print(f"{change['processedAt']} {change['callId']} {before} -> {change['status']}", flush=True)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="freeclimb.call-status.changes")
    parser.add_argument("--group", default="changes-consumer-example")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    consumer = ChangesConsumer(args.bootstrap, args.topic, args.group, print_change)
    await consumer.run(stop)
    counts = consumer.counts
    log.info(
        "handled %d, skipped %d duplicates and %d invalid",
        counts.handled,
        counts.duplicates,
        counts.invalid,
    )


if __name__ == "__main__":
    asyncio.run(main())
