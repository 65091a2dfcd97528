"""A real uvicorn server on loopback for the length of a test (the HTTP server's own
paths: tests/test_frontdoor.py, tests/test_lane.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn


@contextlib.asynccontextmanager
async def on_loopback(srv: uvicorn.Server) -> AsyncIterator[int]:
    """Serve ``srv`` (configured for 127.0.0.1, port 0); yields the port it listens on,
    and stops it at the end."""
    task = asyncio.create_task(srv.serve())
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 10
    while not srv.started:
        assert loop.time() < give_up, "server did not start"
        await asyncio.sleep(0.01)  # polling interval
    try:
        port: int = srv.servers[0].sockets[0].getsockname()[1]
        yield port
    finally:
        srv.should_exit = True
        await task
