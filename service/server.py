"""Assembles a running node from settings: HTTP server, ingest producer, processor.

Start-up order: topics, then the producer, then the processor. Shutdown (SIGTERM) runs
in reverse so nothing that was acknowledged is dropped:
1. /readyz turns 503 and, after ``drain_delay_seconds``, the listener closes;
2. in-flight requests finish (bounded by ``shutdown_grace_seconds``), so every 202
   already waited for its broker ack;
3. the processor finishes or aborts its open transaction and leaves the group;
4. the producer flushes and closes.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import structlog
import uvicorn
from starlette.applications import Starlette

from service.app import create_app
from service.kafka import IngestProducer, ensure_topics, retry_at_start
from service.processor import Processor
from service.settings import Role, Settings

log = structlog.get_logger(logger_name="callstatus.server")

# After the grace period, how long Kafka clients get to close before the process exits
# anyway (deploy/k8s's terminationGracePeriodSeconds budgets for it).
CLIENT_CLOSE_SECONDS = 10.0


class DrainingServer(uvicorn.Server):
    """uvicorn, with a readiness drain before the listener closes on the first signal."""

    def __init__(self, config: uvicorn.Config, draining: dict[str, bool], delay: float) -> None:
        super().__init__(config)
        self._draining = draining
        self._delay = delay
        # Set when the processor died on its own: the process must then exit non-zero.
        self.failed = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining["value"] or self._delay <= 0 or sig != signal.SIGTERM:
            self._draining["value"] = True
            super().handle_exit(sig, frame)
            return
        self._draining["value"] = True
        log.info("draining before shutdown", seconds=self._delay)
        asyncio.get_running_loop().call_later(self._delay, super().handle_exit, sig, frame)


def build(settings: Settings) -> DrainingServer:
    publisher = IngestProducer(settings) if settings.role.runs_ingest else None
    processor = Processor(settings) if settings.role.runs_processor else None
    server: DrainingServer | None = None

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await retry_at_start(lambda: ensure_topics(settings), "topics")
        if publisher is not None:
            await retry_at_start(publisher.start, "producer")
        task: asyncio.Task[None] | None = None
        if processor is not None:
            task = asyncio.create_task(processor.run(), name="processor")
            task.add_done_callback(_exit_when_processor_dies)
        log.info("started", role=settings.role.value, port=settings.port)
        try:
            yield
        finally:
            if task is not None:
                task.remove_done_callback(_exit_when_processor_dies)
            try:
                # Bounded: with Kafka gone, leaving the group or flushing could wait for
                # minutes. Exiting without them loses nothing: an open transaction is
                # aborted by the next owner, and every 202 was already acknowledged.
                await asyncio.wait_for(
                    _stop(task), settings.shutdown_grace_seconds + CLIENT_CLOSE_SECONDS
                )
            except TimeoutError:
                log.error("shutdown did not finish in time; exiting without it")
            log.info("stopped")

    async def _stop(task: asyncio.Task[None] | None) -> None:
        if processor is not None and task is not None:
            await processor.stop()
            await task
        if publisher is not None:
            await publisher.stop()

    def _exit_when_processor_dies(task: asyncio.Task[None]) -> None:
        # The processor only returns when asked to; anything else is a bug we must not
        # hide behind a live HTTP server: exit, and let the supervisor restart us.
        if not task.cancelled() and task.exception() is not None:
            log.error("processor crashed", exc_info=task.exception())
        if server is not None:
            server.failed = True
            server.should_exit = True

    # In role=all the processor's rebalances must not take the webhook endpoint out of
    # the load balancer, so only a processor-only node reports its restore progress.
    readiness = processor if settings.role is Role.PROCESSOR else None
    app = create_app(settings, publisher, readiness, lifespan)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        server_header=False,
    )
    server = DrainingServer(config, app.state.draining, settings.drain_delay_seconds)
    return server
