"""Reading a request body straight from ASGI ``receive()``: under a size cap and a read
deadline, refusing with an entry of ``problems`` when either is passed or the client
hangs up first.

The deadlines of all requests are kept by one watchdog (:class:`ReadDeadlines`) rather
than one timer each, because every ingest request reads a body.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import Receive

from service import problems
from service.problems import Refused


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """Read the body, refusing it as soon as it passes ``limit`` bytes: a declared
    Content-Length over the limit is refused before reading anything, and a streamed
    body without one is cut off at the first chunk that crosses the limit. Raises
    ``ClientDisconnect`` when the client hangs up first."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                # A webhook arrives in one chunk: no join, no copy.
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif kind == "http.disconnect":
            raise ClientDisconnect()


def too_large(limit: int) -> Refused:
    return Refused(problems.TOO_LARGE, f"the body exceeds {limit} bytes")


class ReadDeadlines:
    """Body-read deadlines for all requests, kept by one watchdog instead of one timer
    each: a request costs a dict insert and delete, and the watchdog runs only while
    reads are in flight, checking about ``resolution`` often. A read past its deadline
    gets its task cancelled and is reported as expired."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.resolution = min(1.0, timeout / 2)
        self._reading: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_loop: asyncio.AbstractEventLoop | None = None

    def start(self, task: asyncio.Task[Any]) -> None:
        loop = task.get_loop()
        self._reading[task] = loop.time() + self.timeout
        # A watchdog of a loop that has ended (tests run one loop after another) is dead.
        if self._watchdog is None or self._watchdog_loop is not loop:
            self._watchdog = loop.call_later(self.resolution, self._check, loop)
            self._watchdog_loop = loop

    def finish(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching ``task``; True when its deadline had passed and cancelled it."""
        self._reading.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, deadline in list(self._reading.items()):
            if deadline <= now:
                del self._reading[task]
                self._expired.add(task)
                task.cancel()
        self._watchdog = (
            loop.call_later(self.resolution, self._check, loop) if self._reading else None
        )


class BodyReader:
    """Whole bodies of at most ``limit`` bytes, each received within ``timeout`` seconds,
    or :class:`Refused` (too large, too slow, or the client closed the connection)."""

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self._timeout = timeout
        self._deadlines = ReadDeadlines(timeout)

    async def read(self, receive: Receive, declared: bytes | None) -> bytes:
        """The body; ``declared`` is the request's Content-Length header, if any."""
        task = asyncio.current_task()
        assert task is not None
        self._deadlines.start(task)
        try:
            body = await read_body(receive, declared, self.limit)
        except asyncio.CancelledError:
            # Ours only if the deadline cancelled it and nobody else (shutdown) did too.
            if not self._deadlines.finish(task) or task.uncancel() > 0:
                raise
            raise Refused(
                problems.TOO_SLOW, f"the body was not received within {self._timeout} s"
            ) from None
        except ClientDisconnect:
            self._deadlines.finish(task)
            # Not our failure and nobody to answer: counted apart, so a client that hangs
            # up mid-body cannot trip the 5xx alert.
            raise Refused(problems.CLIENT_CLOSED, "the client closed the connection") from None
        except BaseException:
            self._deadlines.finish(task)
            raise
        if self._deadlines.finish(task):
            # Cannot happen while read_body lets CancelledError through, but if it ever
            # swallowed one: the deadline's cancellation would hit the next await. Take it
            # here, so it cannot cut the answer short.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
            task.uncancel()
        return body
