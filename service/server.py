"""Assembles a running node from settings: HTTP server, ingest producer, processor.

Start-up order: topics, then the producer, then the processor. With the spool on, a
node whose Kafka is unreachable at start comes up anyway and takes webhooks into the
spool, connecting in the background (a node that finds Kafka but a wrong topic layout
still refuses to start). Shutdown (SIGTERM) runs in reverse so nothing that was
acknowledged is dropped:
1. /readyz turns 503 and, after ``drain_delay_seconds``, the listener closes;
2. in-flight requests finish (bounded by ``shutdown_grace_seconds``), so every 202
   already waited for its broker ack;
3. the processor finishes or aborts its open transaction and leaves the group;
4. the producer flushes and closes.

While running, the ingest producer supervises itself (``service.producer``: rebuilt
after errors it cannot recover from) and the processor restarts itself from Kafka's
committed truth; a processor that dies anyway ends the process, so the supervisor
(Kubernetes) restarts it rather than leaving a half-working node behind.
"""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from types import FrameType

import structlog
import uvicorn
from aiokafka.errors import KafkaError
from starlette.applications import Starlette

from service import heap, logs
from service.accounts import AccountsWatcher, StaticAccounts, open_source
from service.app import create_app
from service.frontdoor import FrontDoor
from service.kafka import ensure_topics, retry_at_start
from service.processor import Processor
from service.producer import IngestProducer
from service.publisher import SpoolingPublisher
from service.reconciler import reconciler_for, say_off
from service.settings import Role, Settings
from service.spool import Spool

log = structlog.get_logger(logger_name="callstatus.server")

# After the grace period, how long Kafka clients get to close before the process exits
# anyway (deploy/k8s's terminationGracePeriodSeconds budgets for it).
CLIENT_CLOSE_SECONDS = 10.0


def publisher_for(settings: Settings) -> IngestProducer | SpoolingPublisher:
    producer = IngestProducer(settings)
    if not settings.spool_enabled:
        return producer
    spool = Spool(settings.spool_dir, settings.spool_max_bytes)
    return SpoolingPublisher(producer, spool, settings.shutdown_grace_seconds)


class Node:
    """The parts one process runs (by role) and their lifecycle: start, drain, stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.publisher = publisher_for(settings) if settings.role.runs_ingest else None
        self.processor = Processor(settings) if settings.role.runs_processor else None
        # Loaded now, so a bad accounts file stops the start like a bad setting (exit 2,
        # one line). Ingest judges signatures by it; the reconciler takes the API keys
        # from it. One watcher for both (role all): one reload, one book, one metric.
        # A processor-only node without an accounts file needs none.
        wants_accounts = settings.role.runs_ingest or settings.accounts_file is not None
        self.accounts: AccountsWatcher | StaticAccounts | None = (
            open_source(settings) if wants_accounts else None
        )
        self._watching: asyncio.Task[None] | None = None
        # Beside the processor, fetching the calls of its partitions (section 12).
        self.reconciler = reconciler_for(settings, self.processor, self.publisher, self.accounts)
        self._reconciling: asyncio.Task[None] | None = None
        # Set on the first SIGTERM: /readyz answers 503 while requests are still served.
        self.draining = False
        # Set when the processor died on its own: the process must then exit non-zero.
        self.failed = False
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        if self.accounts is not None:
            # First: the file must be followed from the first request on.
            self._watching = asyncio.create_task(self.accounts.run(), name="accounts-watch")
        if isinstance(self.publisher, SpoolingPublisher):
            # FreeClimb does not retry: a node that waits for Kafka before it listens
            # loses every callback sent meanwhile (a pod rescheduled during a broker
            # outage). With a spool, take them from the first moment.
            self.publisher.open()
            try:
                await ensure_topics(settings)
            except KafkaError as exc:
                log.warning(
                    "kafka not reachable at start; webhooks go to the spool until it is",
                    error=repr(exc),
                )
                self._connecting = asyncio.create_task(self._connect(), name="kafka-connect")
                self._connecting.add_done_callback(self._connect_ended)
                log.info("started", role=settings.role.value, port=settings.port, kafka=False)
                return
        else:
            await retry_at_start(lambda: ensure_topics(settings), "topics")
        await self._start_kafka_parts(deadline_seconds=60.0)
        log.info("started", role=settings.role.value, port=settings.port, kafka=True)

    async def _start_kafka_parts(self, deadline_seconds: float) -> None:
        if self.publisher is not None:
            await retry_at_start(self.publisher.start, "producer", deadline_seconds)
            heap.freeze_once("publisher")  # the app and the producer are up
        if self.processor is not None:
            self._task = asyncio.create_task(self.processor.run(), name="processor")
            self._task.add_done_callback(self._processor_ended)
        if self.reconciler is not None:
            self._reconciling = asyncio.create_task(self.reconciler.run(), name="reconciler")
        elif self.processor is not None:
            say_off()

    async def _connect(self) -> None:
        """Kafka, in the background, for as long as it takes: the node is doing its job
        (the spool holds what comes in) and its drainer sends it all once connected."""
        await retry_at_start(lambda: ensure_topics(self.settings), "topics", math.inf)
        await self._start_kafka_parts(deadline_seconds=math.inf)
        log.info("kafka reachable; spooled webhooks are being sent")

    def _connect_ended(self, task: asyncio.Task[None]) -> None:
        # Only a wrong topic layout (or a bug) ends it early: exit, as a start would.
        if task.cancelled() or task.exception() is None:
            return
        log.error("kafka start failed", exc_info=task.exception())
        self.failed = True
        if self.server is not None:
            self.server.should_exit = True

    async def stop(self) -> None:
        """Stop the processor, then the producer. Bounded: with Kafka gone, leaving the
        group or flushing could wait for minutes. Exiting without them loses nothing: an
        open transaction is aborted by the next owner, and every 202 was acknowledged."""
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.wait((self._connecting,))
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.wait((self._watching,))
        if self._task is not None:
            self._task.remove_done_callback(self._processor_ended)
        bound = self.settings.shutdown_grace_seconds + CLIENT_CLOSE_SECONDS
        try:
            await asyncio.wait_for(self._stop_parts(), bound)
        except TimeoutError:
            log.error("shutdown did not finish in time; exiting without it")
        log.info("stopped")

    async def _stop_parts(self) -> None:
        if self._reconciling is not None:
            # First, and alone: what it publishes goes through the publisher, stopped
            # next. Cancelled, not waited for: a round may be in a slow API call, and
            # what it had not published yet is fetched again by the next owner.
            self._reconciling.cancel()
            await asyncio.wait((self._reconciling,))  # its failure is logged by run()
        # Side by side: the processor ends its transaction while the spool drains.
        await asyncio.gather(self._stop_processor(), self._stop_publisher())

    async def _stop_processor(self) -> None:
        if self.processor is not None and self._task is not None:
            await self.processor.stop()
            await self._task

    async def _stop_publisher(self) -> None:
        if self.publisher is not None:
            await self.publisher.stop()

    @asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def _processor_ended(self, task: asyncio.Task[None]) -> None:
        # The processor only returns when asked to; anything else is a bug we must not
        # hide behind a live HTTP server: exit, and let the supervisor restart us.
        if not task.cancelled() and task.exception() is not None:
            log.error("processor crashed", exc_info=task.exception())
        self.failed = True
        if self.server is not None:
            self.server.should_exit = True


class DrainingServer(uvicorn.Server):
    """uvicorn, with a readiness drain before the listener closes on the first signal."""

    def __init__(self, config: uvicorn.Config, node: Node, delay: float, door: FrontDoor) -> None:
        super().__init__(config)
        self.node = node
        self._delay = delay
        self.door = door

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's 10 Hz housekeeping tick: the front door's deadlines ride on it.
        self.door.tick(asyncio.get_running_loop().time())
        return await super().on_tick(counter)

    @property
    def failed(self) -> bool:
        return self.node.failed

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.node.draining or self._delay <= 0 or sig != signal.SIGTERM:
            self.node.draining = True
            super().handle_exit(sig, frame)
            return
        self.node.draining = True
        loop = asyncio.get_running_loop()
        # Logged from the loop, not from here: a signal handler runs between two
        # bytecodes of whatever the thread was doing, perhaps inside structlog's write
        # under its (not re-entrant) lock, and logging here would then deadlock.
        loop.call_soon_threadsafe(
            partial(log.info, "draining before shutdown", seconds=self._delay)
        )
        loop.call_later(self._delay, super().handle_exit, sig, frame)


def build(settings: Settings) -> DrainingServer:
    # The access log's lines of one event-loop pass go out in one write(2), not one each
    # (service/logs.py): a syscall less per request.
    logs.batch_lines()
    node = Node(settings)
    # In role=all the processor's rebalances must not take the webhook endpoint out of
    # the load balancer, so only a processor-only node reports its restore progress.
    readiness = node.processor if settings.role is Role.PROCESSOR else None
    app = create_app(
        settings, node.publisher, readiness, node.lifespan, lambda: node.draining, node.accounts
    )
    door = FrontDoor(
        settings.header_timeout_seconds,
        settings.max_header_bytes,
        settings.max_header_fields,
        settings.max_connections,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        server_header=False,
        # Nothing here reads the client address or scheme that X-Forwarded-* would
        # rewrite, so uvicorn's proxy-headers middleware would only cost a layer and a
        # pass over the headers per request (and an IP parse behind a load balancer).
        proxy_headers=False,
        **door.uvicorn_options(app.lane),
    )
    server = DrainingServer(config, node, settings.drain_delay_seconds, door)
    node.server = server
    return server
