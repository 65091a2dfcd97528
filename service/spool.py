"""A durable first-in-first-out spool on local disk: where ingest puts an event when
Kafka cannot take it in time, so the event can still be answered 202.

Format, and why
---------------
Append-only segment files (``<number>.seg``) of length-prefixed, CRC-checked records,
plus a ``checkpoint`` file naming the first record not yet delivered to Kafka. Chosen
over SQLite because the spool needs exactly three things, each simple here and each
visible in this one module: appends made durable in groups (one ``fsync`` for every
request that arrived during the previous one), strictly ordered reads from a position,
and a torn tail that is *detected and reported*. A crash mid-write leaves a partial or
mismatching record at the end of a segment; opening the spool cuts the segment there,
logs how many bytes it cut and counts them, and never hands those bytes to Kafka.

A record::

    u32 crc32(body) | u32 len(body) | body
    body = u64 received_ms | u16 len(key) | key | u8 n_headers
           | n x (u8 len(name) | name | u16 len(value) | value) | value

If the process dies after Kafka acknowledged a drained batch but before the checkpoint
moved past it, the batch is still here at the next start. So that it is not sent twice
(a copy whose call's state was retired meanwhile would be a second change), the drainer
notes each batch in ``sending`` before it sends it (:meth:`Spool.mark_sending`), and a
start that finds the note past the checkpoint (:attr:`Spool.unconfirmed`) asks Kafka
which of that batch it has (service/publisher.py).

A record Kafka refuses for good leaves the spool for ``dead-letter/`` in the same
directory (``service/deadletter.py``, written in this module's record format), so that it
never blocks the records behind it.

Disk faults (ENOSPC, EIO) fail the append (its requests get 503) and leave nothing of it
in front of a later record: the failed part is truncated away, or, if the truncate fails
too, the segment is sealed at its last good record and appends move to a new segment.
Nothing remembers the failure, so the spool works again as soon as the disk does.

Only one process may use a spool directory (an exclusive lock on ``lock``).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from service import metrics

log = structlog.get_logger(logger_name="callstatus.spool")

_HEAD = struct.Struct("<II")  # crc32, body length
_BODY_HEAD = struct.Struct("<QH")  # received_ms, key length
SEGMENT_SUFFIX = ".seg"
# No single record is bigger (a body is capped far below this): a larger length field
# can only be garbage.
MAX_RECORD_BYTES = 64 * 1024 * 1024

Headers = Sequence[tuple[str, bytes]]


class SpoolFull(Exception):
    """Appending would pass the spool's size cap."""


class SpoolLocked(Exception):
    """Another process holds the spool directory."""


@dataclass(frozen=True, slots=True)
class Position:
    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class Sending:
    """What the drainer was sending when the process last stopped: the records from the
    checkpoint up to ``end`` may be in Kafka already (sent at ``at_ms`` and acknowledged,
    with the process gone before the checkpoint moved past them)."""

    end: Position
    at_ms: int


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    received_ms: int
    end: Position  # where the next record starts: release(end) frees this one
    size: int


def encode(key: bytes, value: bytes, headers: Headers, received_ms: int) -> bytes:
    parts = [_BODY_HEAD.pack(received_ms, len(key)), key, bytes((len(headers),))]
    for name, val in headers:
        raw = name.encode()
        parts += [bytes((len(raw),)), raw, struct.pack("<H", len(val)), val]
    parts.append(value)
    body = b"".join(parts)
    return _HEAD.pack(zlib.crc32(body), len(body)) + body


def decode(
    data: bytes | memoryview, at: int
) -> tuple[bytes, bytes, list[tuple[str, bytes]], int, int] | None:
    """The record starting at ``at``: (key, value, headers, received_ms, next offset), or
    None when what is there is not a whole, intact record (a torn or corrupt tail)."""
    if len(data) - at < _HEAD.size:
        return None
    crc, length = _HEAD.unpack_from(data, at)
    start = at + _HEAD.size
    end = start + length
    if length < _BODY_HEAD.size + 1 or length > MAX_RECORD_BYTES or end > len(data):
        return None
    body = bytes(data[start:end])
    if zlib.crc32(body) != crc:
        return None
    received_ms, key_len = _BODY_HEAD.unpack_from(body, 0)
    i = _BODY_HEAD.size
    key = body[i : i + key_len]
    i += key_len
    headers = []
    count = body[i]
    i += 1
    for _ in range(count):
        name_len = body[i]
        name = body[i + 1 : i + 1 + name_len].decode()
        i += 1 + name_len
        (val_len,) = struct.unpack_from("<H", body, i)
        headers.append((name, body[i + 2 : i + 2 + val_len]))
        i += 2 + val_len
    return key, body[i:], headers, received_ms, end


class Spool:
    """The spool directory: open it (recovering a torn tail), append durably, read in
    order from the checkpoint, release what Kafka acknowledged."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 64 * 1024 * 1024):
        self.directory = directory
        self.max_bytes = max_bytes
        # Set by open() when the last run may have died between a drained batch's ack
        # and its checkpoint; the drainer settles it, then sets it back to None.
        self.unconfirmed: Sending | None = None
        self.segment_bytes = segment_bytes
        self.events = 0  # records not yet released
        self.bytes = 0  # their size on disk
        self.oldest_ms: int | None = None
        self._lock_fd = -1
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
        self._read = self._load_checkpoint()
        self.unconfirmed = self._load_sending()
        segments = self._segments()
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
                _count("recover", exc)
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
                self.bytes -= sum(map(len, records))
                if not self.bytes:
                    self.empty.set()
                log.error("spool write failed", error=repr(exc))
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            self.events += len(records)
            if self.oldest_ms is None:
                self.oldest_ms = _BODY_HEAD.unpack_from(records[0], _HEAD.size)[0]
            metrics.SPOOL_APPENDS.inc(len(records))
            metrics.SPOOL_EVENTS.set(self.events)
            metrics.SPOOL_BYTES.set(self.bytes)
            self.nonempty.set()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

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
            _count(stage, exc)
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
            _count("truncate", exc)
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
            _count("rotate", exc)
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
            _count("close", exc)
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
        out: list[SpooledRecord] = []
        durable = self._durable
        size = 0
        while len(out) < max_records and size < max_bytes:
            if pos.segment == durable.segment:
                limit = durable.offset
            elif pos.segment < durable.segment:
                limit = self._segment_end(pos.segment)
            else:
                break
            if pos.offset >= limit:
                if pos.segment == durable.segment:
                    break
                pos = Position(pos.segment + 1, 0)
                continue
            with self._path(pos.segment).open("rb") as f:
                f.seek(pos.offset)
                chunk = f.read(min(limit - pos.offset, max(max_bytes - size, _HEAD.size)))
                if len(chunk) >= _HEAD.size:
                    # A record longer than the chunk: read exactly that one.
                    need = _HEAD.size + _HEAD.unpack_from(chunk, 0)[1]
                    if need > len(chunk) and need <= limit - pos.offset:
                        chunk += f.read(need - len(chunk))
            at = 0
            while len(out) < max_records and size < max_bytes:
                record = decode(chunk, at)
                if record is None:
                    break
                key, value, headers, received_ms, end = record
                rec_end = Position(pos.segment, pos.offset + end)
                out.append(SpooledRecord(key, value, headers, received_ms, rec_end, end - at))
                size += end - at
                at = end
            if at == 0:
                # Everything up to ``limit`` was checked when the spool was opened or
                # written, so this is damage since then: refuse to guess past it.
                raise OSError(f"spool segment {pos.segment} unreadable at {pos.offset}")
            pos = Position(pos.segment, pos.offset + at)
        return out

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
            _count("checkpoint", exc)  # the drainer logs it and retries the release
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

    # -- files --------------------------------------------------------------------------

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:012d}{SEGMENT_SUFFIX}"

    def _segments(self) -> list[int]:
        return sorted(
            int(p.name[: -len(SEGMENT_SUFFIX)])
            for p in self.directory.glob(f"*{SEGMENT_SUFFIX}")
            if p.name[: -len(SEGMENT_SUFFIX)].isdigit()
        )

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

    async def mark_sending(self, batch: Sequence[SpooledRecord]) -> None:
        """Durably note how far ``batch`` reaches and when, before the drainer sends it:
        after a crash between Kafka's ack and the checkpoint, the next start then knows
        which records may be in Kafka already and asks it (publisher.py), instead of
        sending them a second time. A failure raises, and the batch is not sent."""
        if not batch:
            return
        end = batch[-1].end
        note = {"segment": end.segment, "offset": end.offset, "at_ms": int(time.time() * 1000)}
        try:
            await asyncio.to_thread(self._store_json, "sending", note)
        except OSError as exc:
            _count("sending", exc)
            raise

    def _load_sending(self) -> Sending | None:
        """The last batch noted as being sent, when it reaches past the checkpoint."""
        try:
            raw = json.loads((self.directory / "sending").read_text())
            sending = Sending(Position(int(raw["segment"]), int(raw["offset"])), int(raw["at_ms"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        if (sending.end.segment, sending.end.offset) <= (self._read.segment, self._read.offset):
            return None  # all of it was released: nothing to ask
        return sending

    def _load_checkpoint(self) -> Position:
        try:
            raw = json.loads((self.directory / "checkpoint").read_text())
            return Position(int(raw["segment"]), int(raw["offset"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return Position(0, 0)

    def _store_checkpoint(self, pos: Position) -> None:
        self._store_json("checkpoint", {"segment": pos.segment, "offset": pos.offset})

    def _store_json(self, name: str, value: dict[str, int]) -> None:
        # Written aside and renamed: a crash leaves the old file or the new one.
        tmp = self.directory / f"{name}.tmp"
        with tmp.open("w") as f:
            json.dump(value, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.directory / name)
        fsync_dir(self.directory)


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a new or renamed file's name) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count(stage: str, exc: OSError) -> None:
    """Count a failed disk operation by stage and errno name (ENOSPC: the volume is
    full; EIO: it is failing), so an alert can tell the two apart."""
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    metrics.SPOOL_DISK_ERRORS.labels(stage, name).inc()
