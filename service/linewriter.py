"""Where all of the process's log lines go: one :class:`LineWriter` (``service.logs``
makes it), which a running server lets write a pass of the event loop's lines at once.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TextIO


class LineWriter:
    """Where all of the process's log lines go (structlog's and the stdlib handler's), so
    that they reach the stream in the order they were logged.

    A line :meth:`queue` d (the access log's) is written at once, unless batching is on
    (:func:`batch_lines`, the running server): then it waits for the end of the event
    loop's current pass and goes out with the others queued in that pass, one write(2)
    for all of them. Every other write first writes what is queued, so order holds; a
    crash can lose at most one pass's access lines, never a warning or an error. Any
    thread may write (the spool's writer thread logs); a lock keeps the queue whole."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.batching = False
        self._queued: list[str] = []
        # Re-entrant: a signal handler that logs (uvicorn's shutdown) runs on this same
        # thread, possibly while it is inside write().
        self._lock = threading.RLock()

    def queue(self, line: str) -> None:
        """``line`` (ending in a newline), now or with the loop pass's others."""
        if self.batching:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no running loop to flush it later: write it now
                self.write(line)
                return
            with self._lock:
                if not self._queued:
                    loop.call_soon(self.flush)
                self._queued.append(line)
            return
        self.write(line)

    def write(self, text: str) -> int:
        with self._lock:
            if self._queued:
                self._write_queued()
            written = self.stream.write(text)
            self.stream.flush()
            return written

    def flush(self) -> None:
        with self._lock:
            if self._queued:
                self._write_queued()
            self.stream.flush()

    def _write_queued(self) -> None:
        # Taken before the write: a signal handler that logs in between (re-entering
        # the lock) then finds nothing queued, rather than writing the same lines twice.
        queued, self._queued = self._queued, []
        self.stream.write("".join(queued))
