"""Where an accepted event goes: Kafka first, the local spool when Kafka cannot take it
in time, and a drainer that moves spooled events to Kafka as soon as it takes writes.

Per-call order: once anything is spooled, every new event is spooled behind it until
the drainer has emptied the spool, and the drainer sends in spool order through the one
ingest producer. So events of a call reach the ingest topic in the order they were
accepted (events of one call that were in flight at the same moment have no order).

The guarantee this gives: a 202 means the event is in Kafka (acks=all) or fsync'd to
the spool volume, and a spooled event reaches Kafka once the broker is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from service import metrics
from service.backoff import Backoff, sleep_or_stop
from service.producer import Headers, IngestProducer, Unavailable
from service.spool import Spool, SpoolFull

log = structlog.get_logger(logger_name="callstatus.publisher")

DRAIN_BATCH = 500


class SpoolingPublisher:
    """The ingest endpoint's publisher when the spool is on."""

    def __init__(self, producer: IngestProducer, spool: Spool, drain_seconds: float) -> None:
        self.producer = producer
        self.spool = spool
        self._drain_seconds = drain_seconds
        self._stopping = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        metrics.SPOOL_OLDEST_AGE.set_function(self._oldest_age)

    def _oldest_age(self) -> float:
        oldest = self.spool.oldest_ms
        return 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)

    def open(self) -> None:
        """Open the spool (cutting a torn tail) and start the drainer, which sends what
        an earlier run left once there is a producer. From here on events are taken."""
        if self._drainer is None:
            self.spool.open()
            self._drainer = asyncio.create_task(self._drain(), name="spool-drainer")

    async def start(self) -> None:
        """Open (if not yet), then build the producer. Raises while Kafka is
        unreachable."""
        self.open()
        await self.producer.start()

    async def stop(self) -> None:
        """Give the drainer up to ``drain_seconds`` to empty the spool, then stop. What
        is left stays on the volume for the next start (and is logged)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.spool.empty.wait(), self._drain_seconds)
        self._stopping.set()
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.wait((self._drainer,))
        if self.spool.events:
            log.warning(
                "spool not empty at shutdown; the next start drains it",
                events=self.spool.events,
                bytes=self.spool.bytes,
                directory=str(self.spool.directory),
            )
        await self.producer.stop()
        self.spool.close()

    async def ready(self) -> bool:
        """Ready while events can be taken: Kafka answers, or the spool has room."""
        return self.spool.has_room() or await self.producer.ready()

    async def publish(self, key: bytes, value: bytes, headers: Headers) -> None:
        """Return once the event is in Kafka or durable in the spool; raise
        :class:`Unavailable` only when neither could take it."""
        if not self.spool.bytes:
            try:
                await self.producer.publish(key, value, headers)
                return
            except Unavailable:
                pass  # the spool takes it below
        try:
            await self.spool.append(key, value, headers)
        except SpoolFull:
            metrics.PRODUCE_ERRORS.labels("spool_full").inc()
            raise Unavailable("spool_full") from None
        except OSError as exc:
            log.error("spool append failed", error=repr(exc))
            metrics.PRODUCE_ERRORS.labels("spool_error").inc()
            raise Unavailable("spool_error") from None

    async def _drain(self) -> None:
        """Send spooled events to Kafka in order; release each batch only after its ack."""
        backoff = Backoff(first=0.2, cap=5.0)
        while not self._stopping.is_set():
            await self.spool.nonempty.wait()
            if not self.producer.usable:
                await sleep_or_stop(0.2, self._stopping)  # waiting for the rebuilt producer
                continue
            try:
                batch = self.spool.read(DRAIN_BATCH)
            except OSError as exc:
                log.error("spool unreadable; drain paused", error=repr(exc))
                await sleep_or_stop(backoff.next_delay(), self._stopping)
                continue
            if not batch:
                await sleep_or_stop(0.05, self._stopping)  # appended but not yet fsync'd
                continue
            acked = await self.producer.send_batch([(r.key, r.value, r.headers) for r in batch])
            if acked:
                self.spool.release(batch[:acked])
                backoff.reset()
            if acked < len(batch):
                await sleep_or_stop(backoff.next_delay(), self._stopping)
