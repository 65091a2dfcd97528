"""A minimal HTTP/1.1 keep-alive client over asyncio streams, for ``callstatus
simulate``: enough to POST a body and read a Content-Length answer, so the command needs
nothing beyond the service's own dependencies."""

from __future__ import annotations

import asyncio
import contextlib

ANSWER_TIMEOUT_S = 30.0  # per attempt; then it counts as no answer


class HttpError(Exception):
    """No HTTP answer: the connection failed, closed or sent something unreadable."""


class Connection:
    """One HTTP/1.1 keep-alive connection, reopened after an error."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):  # a hung server must not hang us
                return await self._post(path, body, headers)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
            await self.close()
            raise HttpError(str(exc) or type(exc).__name__) from exc

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise asyncio.IncompleteReadError(b"", None)
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "transfer-encoding":
                raise ValueError("chunked answers are not expected from the service")
        answer = await reader.readexactly(length)
        if close:
            await self.close()
        return status, answer

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
