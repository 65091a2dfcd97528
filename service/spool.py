"""A durable first-in-first-out spool on local disk: where ingest puts an event when
Kafka cannot take it in time, so the event can still be answered 202.

Format, and why
---------------
Append-only segment files (``<number>.seg``) of length-prefixed, CRC-checked records,
plus a ``checkpoint`` file naming the first record not yet delivered to Kafka. Chosen
over SQLite because the spool needs exactly three things, each simple here and each
visible in this module and its three helpers: appends made durable in groups (one
``fsync`` for every request that arrived during the previous one), strictly ordered
reads from a position, and a torn tail that is *detected and reported*. A crash
mid-write leaves a partial or mismatching record at the end of a segment; opening the
spool cuts the segment there, logs how many bytes it cut and counts them, and never
hands those bytes to Kafka.

The helpers: the record format and reading records back, :mod:`service.spoolformat`;
the checkpoint and the ``sending`` note, :mod:`service.spoolfiles`; the segment files
and the writer thread's side of them, :mod:`service.spoolsegments`.

If the process dies after Kafka acknowledged a drained batch but before the checkpoint
moved past it, the batch is still here at the next start. So that it is not sent twice
(a copy whose call's state was retired meanwhile would be a second change), the drainer
notes each batch in ``sending`` before it sends it (:meth:`Spool.mark_sending`), and a
start that finds the note past the checkpoint (:attr:`Spool.unconfirmed`) asks Kafka
which of that batch it has (service/publisher.py).

A record Kafka refuses for good leaves the spool for ``dead-letter/`` in the same
directory (``service/deadletter.py``, written in the spool's record format), so that it
never blocks the records behind it.

Disk faults (ENOSPC, EIO) fail the append (its requests get 503) and leave nothing of it
in front of a later record: the failed part is truncated away, or, if the truncate fails
too, the segment is sealed at its last good record and appends move to a new segment.
Nothing remembers the failure, so the spool works again as soon as the disk does
(:mod:`service.spoolsegments`).

Only one process may use a spool directory (an exclusive lock on ``lock``).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from service import metrics
from service.headers import Headers
from service.spoolfiles import (
    Position,
    Sending,
    load_checkpoint,
    load_sending,
    store_checkpoint,
    store_sending,
)
from service.spoolformat import (
    SpooledRecord,
    decode,
    encode,
    read_records,
    received_ms_of,
    segment_numbers,
)
from service.spoolsegments import SegmentFiles, count_disk_error

log = structlog.get_logger(logger_name="callstatus.spool")


# After a write the disk refused, how long readiness reports the spool as not taking
# appends (service/publisher.py): long enough to take the node out of a load balancer's
# rotation, short enough that a disk that is back is used again soon.
DISK_RETRY_SECONDS = 5.0


class SpoolFull(Exception):
    """Appending would pass the spool's size cap."""


class SpoolLocked(Exception):
    """Another process holds the spool directory."""


class Spool(SegmentFiles):
    """The spool directory: open it (recovering a torn tail), append durably, read in
    order from the checkpoint, release what Kafka acknowledged. The segment files
    themselves, and the writer thread's side of them, are :class:`SegmentFiles`."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes
        # Set by open() when the last run may have died between a drained batch's ack
        # and its checkpoint; the drainer settles it, then sets it back to None.
        self.unconfirmed: Sending | None = None
        # The note of the batch being sent, kept until the checkpoint passes its end. A
        # batch sent again (no ack, a refusal, a restart) is noted with the time of the
        # first note: an earlier attempt may have landed in Kafka too, and the check
        # after a crash must look back far enough to find it.
        self._noted: Sending | None = None
        super().__init__(directory, segment_bytes)
        self.events = 0  # records not yet released
        self.bytes = 0  # their size on disk
        self.oldest_ms: int | None = None
        self.write_failed_at: float | None = None  # monotonic time of the last failed write
        self._lock_fd = -1
        self._read = Position(0, 0)  # the checkpoint: first record not yet released
        self._pending: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.nonempty = asyncio.Event()
        self.empty = asyncio.Event()  # no undelivered event, none being written

    # -- open and recover -------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, cut any torn tail, count what is waiting.

        Blocking disk I/O on the caller's thread, on purpose: it runs once at start,
        before the listener accepts a request, so there is no HTTP answer to delay."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"another process uses the spool in {self.directory}") from None
        self._read = load_checkpoint(self.directory)
        self.unconfirmed = self._noted = load_sending(self.directory, self._read)
        segments = segment_numbers(self.directory)
        for number in segments:
            if number < self._read.segment:
                (self._path(number)).unlink()  # fully released before the last crash
        segments = [n for n in segments if n >= self._read.segment]
        for number in segments:
            start = self._read.offset if number == self._read.segment else 0
            self._recover_segment(number, start)
        if self.events:
            self.nonempty.set()
        else:
            self.empty.set()
        self._write_segment = max(segments, default=max(self._read.segment, 1))
        if not segments:
            self._read = Position(self._write_segment, 0)
        if self._write_segment not in self._sealed:
            self._poisoned = False  # a sealed segment before the last takes no appends
        self._open_for_append(self._write_segment)
        metrics.SPOOL_EVENTS.set(self.events)
        metrics.SPOOL_BYTES.set(self.bytes)
        if self.events:
            log.warning("spool holds undelivered events", events=self.events, bytes=self.bytes)

    def _recover_segment(self, number: int, start: int) -> None:
        path = self._path(number)
        data = path.read_bytes()
        at = start
        while at < len(data):
            record = decode(data, at)
            if record is None:
                break
            if self.oldest_ms is None:
                self.oldest_ms = record[3]
            self.events += 1
            self.bytes += record[4] - at
            at = record[4]
        if at < len(data):
            # A write the crash interrupted (or a damaged disk): never replay it.
            cut = len(data) - at
            metrics.SPOOL_CORRUPT_BYTES.inc(cut)
            log.error("spool tail was torn or corrupt; cut it off", segment=path.name, bytes=cut)
            try:
                with path.open("r+b") as f:
                    f.truncate(at)
                    os.fsync(f.fileno())
            except OSError as exc:
                # The disk refuses the cut: the records before it are still good, so
                # start anyway, but read this segment only up to ``at`` and never append
                # to it (a record behind the garbage would be cut with it next time).
                count_disk_error("recover", exc)
                log.error(
                    "spool tail could not be cut; the segment is sealed before it",
                    segment=path.name,
                    error=repr(exc),
                )
                self._sealed[number] = at
                self._poisoned = True  # only matters if it is the last segment

    def close(self) -> None:
        for fd in (self._write_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._write_fd = self._lock_fd = -1

    # -- append (group commit) --------------------------------------------------------

    def has_room(self, size: int = 0) -> bool:
        return self.bytes + size <= self.max_bytes

    def takes_appends(self, now: float) -> bool:
        """Whether an append can be expected to work (for readiness): room under the
        cap, and no write the disk refused in the last DISK_RETRY_SECONDS (``now`` is
        time.monotonic()). A full or failing disk under the cap answers every spooled
        request 503; readiness saying so lets the load balancer send webhooks to nodes
        that can keep them. After the pause, appends are tried again: a disk that is
        back heals by itself, one that is not turns the node unready again."""
        failed = self.write_failed_at
        return self.has_room() and (failed is None or now - failed >= DISK_RETRY_SECONDS)

    async def append(self, key: bytes, value: bytes, headers: Headers) -> None:
        """Return once the event is on disk and fsync'd, or raise :class:`SpoolFull`."""
        record = encode(key, value, headers, int(time.time() * 1000))
        if not self.has_room(len(record)):
            raise SpoolFull
        # Counted at once, so concurrent appends cannot overshoot the cap together.
        self.bytes += len(record)
        self.empty.clear()
        waiter = asyncio.get_running_loop().create_future()
        self._pending.append(record)
        self._waiters.append(waiter)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="spool-flush")
        # Cancelling this request does not take the event back: it is (or will be) on
        # disk and will be delivered, like any other spooled event.
        await waiter

    async def _flush(self) -> None:
        """Write and fsync everything pending, again and again while more arrives: every
        request that came during one fsync shares the next."""
        while self._pending:
            records, self._pending = self._pending, []
            waiters, self._waiters = self._waiters, []
            try:
                await asyncio.to_thread(self._write, b"".join(records))
            except OSError as exc:
                self.write_failed_at = time.monotonic()
                self.bytes -= sum(map(len, records))
                if not self.bytes:
                    self.empty.set()
                log.error("spool write failed", error=repr(exc))
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            self.write_failed_at = None
            self.events += len(records)
            if self.oldest_ms is None:
                self.oldest_ms = received_ms_of(records[0])
            metrics.SPOOL_APPENDS.inc(len(records))
            metrics.SPOOL_EVENTS.set(self.events)
            metrics.SPOOL_BYTES.set(self.bytes)
            self.nonempty.set()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # -- read and release -------------------------------------------------------------

    def read(self, max_records: int, max_bytes: int = 1024 * 1024) -> list[SpooledRecord]:
        """Up to ``max_records`` durable records from the checkpoint on, in order. Blocking
        file reads: the drainer calls :meth:`next_batch`, which runs this in a thread."""
        return self._read_from(self._read, max_records, max_bytes)

    async def next_batch(self, max_records: int) -> list[SpooledRecord]:
        """:meth:`read` in a worker thread, so a slow disk never stalls the event loop
        (the HTTP answers). Safe beside appends: the writer thread only ever moves the
        durable end forward, as one tuple, and only the drainer moves the checkpoint."""
        return await asyncio.to_thread(self.read, max_records)

    def _read_from(self, pos: Position, max_records: int, max_bytes: int) -> list[SpooledRecord]:
        return read_records(
            self.directory, pos, self._durable, self._segment_end, max_records, max_bytes
        )

    async def release(self, done: Sequence[SpooledRecord]) -> None:
        """Forget records Kafka acknowledged (a prefix of what :meth:`read` returned): move
        the checkpoint durably past them, delete segments wholly behind it.

        The disk work (the checkpoint's write, fsync and rename, the directory fsync, the
        unlinks) runs in a worker thread, as appends do, so an fsync never holds up the
        event loop. The counts change on the event loop, and only once the checkpoint is
        durable: if its write fails (disk full, EIO, a directory in the way) this raises
        and nothing is released, so the records are sent again (at least once, never
        lost). Only the drainer calls this, one call at a time, so the checkpoint it
        moves is never moved by anyone else meanwhile."""
        if not done:
            return
        end, oldest = await asyncio.to_thread(self._release_on_disk, done[-1].end)
        self._read = end
        if self._noted is not None and _reaches(end, self._noted.end):
            self._noted = None  # all of it is released: the next batch is a first send
        self.events -= len(done)
        self.bytes -= sum(r.size for r in done)
        if self.events:
            if oldest is None:
                # Every counted event is durable, so what was appended while the
                # checkpoint was written is readable now: look again.
                oldest = await asyncio.to_thread(self._peek_received_ms, end)
            self.oldest_ms = oldest
        else:
            self.oldest_ms = None
            self.nonempty.clear()
            if not self.bytes:
                self.empty.set()
        metrics.SPOOL_DRAINED.inc(len(done))
        metrics.SPOOL_EVENTS.set(self.events)
        metrics.SPOOL_BYTES.set(self.bytes)

    def _release_on_disk(self, end: Position) -> tuple[Position, int | None]:
        """In a worker thread: store the checkpoint at ``end`` (raises, changing nothing,
        when that fails), then delete the segments behind it and read the received time
        of the record now first (neither of which may fail the release any more: the
        checkpoint already moved). Returns the checkpoint and that time (None: none)."""
        if end.segment < self._write_segment and end.offset >= self._segment_end(end.segment):
            end = Position(end.segment + 1, 0)
        try:
            self._store_checkpoint(end)
        except OSError as exc:
            count_disk_error("checkpoint", exc)  # the drainer logs it and retries the release
            raise
        for number in range(self._read.segment, end.segment):
            self._sealed.pop(number, None)
            try:
                self._path(number).unlink(missing_ok=True)
            except OSError as exc:
                # Harmless: the next open() deletes segments behind the checkpoint.
                metrics.SPOOL_DRAIN_ERRORS.labels("unlink").inc()
                log.warning("released spool segment not deleted", segment=number, error=repr(exc))
        return end, self._peek_received_ms(end)

    def _peek_received_ms(self, pos: Position) -> int | None:
        try:
            following = self._read_from(pos, 1, 1024 * 1024)
        except OSError as exc:
            # Only the age gauge reads it; the drain's own read reports the damage.
            log.warning("spool record after the checkpoint unreadable", error=repr(exc))
            return None
        return following[0].received_ms if following else None

    def _store_checkpoint(self, pos: Position) -> None:
        """Blocking: the release's worker thread calls it."""
        store_checkpoint(self.directory, pos)

    async def mark_sending(self, batch: Sequence[SpooledRecord]) -> None:
        """Durably note how far ``batch`` reaches and when, before the drainer sends it:
        after a crash between Kafka's ack and the checkpoint, the next start then knows
        which records may be in Kafka already and asks it (publisher.py), instead of
        sending them a second time. A failure raises, and the batch is not sent."""
        if not batch:
            return
        at_ms, end = int(time.time() * 1000), batch[-1].end
        if self._noted is not None:
            # Sent again, perhaps fewer records (one at a time after a refusal): what
            # the first attempt sent may be in Kafka, so keep its time and its reach.
            at_ms = min(at_ms, self._noted.at_ms)
            if _reaches(self._noted.end, end):
                end = self._noted.end
        note = Sending(end, at_ms)
        try:
            await asyncio.to_thread(store_sending, self.directory, note)
        except OSError as exc:
            count_disk_error("sending", exc)
            raise
        self._noted = note


def _reaches(pos: Position, end: Position) -> bool:
    return (pos.segment, pos.offset) >= (end.segment, end.offset)
