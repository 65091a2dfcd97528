"""The spool's segment files: their names and where each one's records end, and the
writer thread's side of them: appending one group of records to the last segment and
fsyncing it, so that a failed write never leaves bytes in front of a later record.

How a disk fault (ENOSPC, EIO) is contained: the failed part of a group is truncated
away; if the truncate fails too, the segment is *poisoned* and the next append first
moves to a new segment, leaving the old one *sealed* at its last good record (readers
stop there, whatever the file's size). Nothing remembers the failure, so appends work
again as soon as the disk does. Every failed operation is counted by stage and errno
(:func:`count_disk_error`).

:class:`service.spool.Spool` is one of these; the writer-thread methods run only in
``asyncio.to_thread`` from its flusher, one at a time.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import structlog

from service import metrics
from service.spoolfiles import Position, fsync_dir
from service.spoolformat import segment_path

log = structlog.get_logger(logger_name="callstatus.spool")


class SegmentFiles:
    """The segment files of one spool directory, and the append position in them."""

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self._write_fd = -1
        self._write_segment = 0
        self._write_offset = 0
        # Set when a failed write could not be cut off (ftruncate failed too): the
        # segment's tail may hold garbage, and a record appended behind garbage would be
        # cut with it by the next open(). The next append moves to a new segment first.
        self._poisoned = False
        # Where the valid records end in segments left behind by a rotation: a poisoned
        # one is longer than that (garbage), so its file size must not be trusted.
        # Written by the writer thread before the durable end moves past the segment.
        self._sealed: dict[int, int] = {}
        # End of what is fsync'd: readers never look past it. One tuple, replaced whole,
        # because the writer thread moves it while the event loop reads it.
        self._durable = Position(0, 0)

    def _path(self, number: int) -> Path:
        return segment_path(self.directory, number)

    def _segment_size(self, number: int) -> int:
        try:
            return self._path(number).stat().st_size
        except FileNotFoundError:
            return 0

    def _segment_end(self, number: int) -> int:
        """Where the records of a segment behind the write segment end: its size, or,
        for one sealed with garbage after its records, where the garbage starts."""
        sealed = self._sealed.get(number)
        return self._segment_size(number) if sealed is None else sealed

    # -- appending (the writer thread; open() opens the first segment) ---------------------

    def _write(self, data: bytes) -> None:
        """In the writer thread: append one group and fsync it, or raise (every request
        of the group then gets 503) leaving no byte of it where a later group would sit
        behind it."""
        if self._poisoned or self._write_offset >= self.segment_bytes:
            self._rotate()  # raises (the group fails) while the disk refuses a new file
        view = memoryview(data)
        stage = "write"
        try:
            while view:
                written = os.write(self._write_fd, view)
                view = view[written:]
            stage = "fsync"
            os.fsync(self._write_fd)
        except OSError as exc:
            count_disk_error(stage, exc)
            self._cut_failed_group()
            raise
        self._write_offset += len(data)
        self._durable = Position(self._write_segment, self._write_offset)

    def _cut_failed_group(self) -> None:
        """Cut what part of a failed group reached the file. If even that fails, the
        tail is garbage that the next open() cuts, with anything written behind it: so
        the segment is poisoned and the next append goes to a new one."""
        try:
            os.ftruncate(self._write_fd, self._write_offset)
        except OSError as exc:
            count_disk_error("truncate", exc)
            self._poisoned = True
            log.error(
                "spool could not cut a failed write; the next append starts a new segment",
                segment=self._path(self._write_segment).name,
                offset=self._write_offset,
                error=repr(exc),
            )

    def _rotate(self) -> None:
        """Move appends to the next segment. The new file is opened (and its name made
        durable) before the old one is closed: a failure leaves the old fd open and in
        use, never a closed fd number that a later close() would take from whoever the
        kernel gave that number to meanwhile."""
        try:
            fd = self._open_segment(self._write_segment + 1)
        except OSError as exc:
            count_disk_error("rotate", exc)
            log.error(
                "spool could not start a new segment",
                segment=self._path(self._write_segment + 1).name,
                error=repr(exc),
            )
            raise
        old, old_segment = self._write_fd, self._write_segment
        # Sealed before the durable end moves past it: a reader in another thread that
        # sees the new durable end also sees where this segment's records end.
        self._sealed[old_segment] = self._write_offset
        self._write_fd = fd
        self._write_segment = old_segment + 1
        self._write_offset = os.fstat(fd).st_size
        self._poisoned = False
        self._durable = Position(self._write_segment, self._write_offset)
        try:
            os.close(old)
        except OSError as exc:
            # Linux frees the fd number even when close() reports an error, and every
            # record in it was fsync'd: nothing to undo, only to report.
            count_disk_error("close", exc)
            log.warning("spool segment close failed", segment=old_segment, error=repr(exc))

    def _open_segment(self, number: int) -> int:
        fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # Every time, not only when the file is new: a retry after a directory fsync
            # that failed finds the file there, and its name must survive a crash too.
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _open_for_append(self, number: int) -> None:
        self._write_fd = self._open_segment(number)
        self._write_segment = number
        # A segment sealed at open (a tail it could not cut) ends where its records do,
        # not where its garbage does: readers must stop there, and so must the seal
        # the rotation of the first append writes.
        sealed = self._sealed.get(number)
        self._write_offset = os.fstat(self._write_fd).st_size if sealed is None else sealed
        self._durable = Position(number, self._write_offset)


def count_disk_error(stage: str, exc: OSError) -> None:
    """Count a failed disk operation by stage and errno name (ENOSPC: the volume is
    full; EIO: it is failing), so an alert can tell the two apart."""
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    metrics.SPOOL_DISK_ERRORS.labels(stage, name).inc()
