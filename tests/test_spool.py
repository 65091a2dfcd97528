"""The spool on a real file system: durable appends in groups, order, release across
restarts, the size cap, one owner, a torn tail cut off and reported, a checkpoint the
disk refuses, no disk I/O of release or append on the event loop, and real disk faults
(a full tmpfs, a loop device failing fsync, a truncate the kernel refuses, no inode
left for a new segment): refused, never 202'd, healed by themselves."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from service import metrics
from service.spool import DISK_RETRY_SECONDS, Spool, SpoolFull, SpoolLocked
from service.spoolfiles import Position, Sending, store_sending
from service.spoolformat import encode
from tests.diskfault import append_only, fill, fsync_failing_disk, small_tmpfs, use_up_inodes


def opened(path: Path, max_bytes: int = 1 << 20, segment_bytes: int = 1 << 20) -> Spool:
    spool = Spool(path, max_bytes, segment_bytes)
    spool.open()
    return spool


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def values(spool: Spool) -> list[bytes]:
    return [r.value for r in spool.read(10_000)]


async def test_appends_read_back_in_order_with_keys_and_headers(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for i in range(5):
        await spool.append(b"CA%d" % i, b'{"n":%d}' % i, [("ce_id", b"id-%d" % i)])
    records = spool.read(100)
    assert [r.value for r in records] == [b'{"n":%d}' % i for i in range(5)]
    assert [r.key for r in records] == [b"CA%d" % i for i in range(5)]
    assert records[2].headers == [("ce_id", b"id-2")]
    assert spool.events == 5 and spool.nonempty.is_set() and not spool.empty.is_set()
    spool.close()


async def test_concurrent_appends_share_fsyncs(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    groups: list[int] = []
    write = spool._write

    def counting_write(data: bytes) -> None:
        groups.append(len(data))
        write(data)

    spool._write = counting_write  # type: ignore[method-assign]
    await asyncio.gather(*(spool.append(b"k", b"v%d" % i, []) for i in range(200)))
    assert spool.events == 200
    assert len(groups) < 20, f"{len(groups)} fsyncs for 200 concurrent appends"
    spool.close()


async def test_release_survives_a_restart_and_frees_segments(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=256)  # a new segment every few records
    for i in range(40):
        await spool.append(b"k", b"value-%03d" % i, [])
    segments_before = len(segments(tmp_path))
    first = spool.read(25)
    await spool.release(first)
    assert len(segments(tmp_path)) < segments_before
    spool.close()

    again = opened(tmp_path, segment_bytes=256)
    assert again.events == 15
    assert values(again) == [b"value-%03d" % i for i in range(25, 40)]
    await again.release(again.read(100))
    assert again.events == 0 and again.empty.is_set() and again.bytes == 0
    await again.append(b"k", b"after", [])
    assert values(again) == [b"after"]
    again.close()


async def test_a_batch_noted_as_sending_and_not_released_is_unconfirmed_at_the_next_open(
    tmp_path: Path,
) -> None:
    spool = opened(tmp_path)
    for i in range(5):
        await spool.append(b"k", b"v%d" % i, [])
    assert spool.unconfirmed is None
    await spool.release(spool.read(2))
    batch = spool.read(2)
    await spool.mark_sending(batch)  # then the process dies before the release
    spool.close()

    again = opened(tmp_path)
    assert again.unconfirmed is not None
    assert again.unconfirmed.end == batch[-1].end
    assert abs(again.unconfirmed.at_ms / 1000 - time.time()) < 60
    # Once released (the drainer settled it, or sent it), the note is behind the
    # checkpoint and means nothing at the next open.
    await again.release(again.read(2))
    again.close()
    assert opened(tmp_path).unconfirmed is None


async def test_a_batch_sent_again_keeps_the_time_of_its_first_note(tmp_path: Path) -> None:
    """A batch noted, then noted again (sent again after no ack, or after a restart that
    found it unconfirmed) keeps the first note's time: an earlier attempt may be in
    Kafka, and the check after the next crash must look back to it. Before, a second
    crash in a row asked Kafka only from the second note, and records the first run
    delivered were sent again."""
    spool = opened(tmp_path)
    for i in range(4):
        await spool.append(b"k", b"v%d" % i, [])
    batch = spool.read(2)
    store_sending(tmp_path, Sending(batch[-1].end, 1_000))  # an old note: run one's
    spool.close()

    again = opened(tmp_path)  # run two finds it unconfirmed, and sends it again, one
    await again.mark_sending(again.read(1))  # record at a time (a refusal among them)
    again.close()
    third = opened(tmp_path)  # run two died too
    assert third.unconfirmed is not None and third.unconfirmed.at_ms == 1_000
    assert third.unconfirmed.end == batch[-1].end  # and the first attempt's reach
    # Once the checkpoint is past it, the next batch is a first send with its own time.
    await third.release(third.read(2))
    await third.mark_sending(third.read(2))
    third.close()
    fourth = opened(tmp_path)
    assert fourth.unconfirmed is not None
    assert abs(fourth.unconfirmed.at_ms / 1000 - time.time()) < 60
    fourth.close()


async def test_a_torn_tail_is_cut_off_and_reported(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for i in range(3):
        await spool.append(b"k", b"whole-%d" % i, [])
    spool.close()
    segment = segments(tmp_path)[0]
    # A crash in the middle of a write: half of a fourth record reached the disk.
    torn = encode(b"k", b"never-acknowledged", [], 0)
    with segment.open("ab") as f:
        f.write(torn[: len(torn) // 2])
    cut_before = metrics.SPOOL_CORRUPT_BYTES._value.get()

    reopened = opened(tmp_path)
    assert values(reopened) == [b"whole-0", b"whole-1", b"whole-2"]
    assert metrics.SPOOL_CORRUPT_BYTES._value.get() == cut_before + len(torn) // 2
    await reopened.append(b"k", b"next", [])  # written after the cut, readable
    assert values(reopened)[-1] == b"next"
    reopened.close()


async def test_a_corrupt_record_is_never_replayed(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    await spool.append(b"k", b"good", [])
    await spool.append(b"k", b"flipped", [])
    spool.close()
    segment = segments(tmp_path)[0]
    data = bytearray(segment.read_bytes())
    data[-2] ^= 0xFF  # one bit of damage inside the last record's value
    segment.write_bytes(bytes(data))
    reopened = opened(tmp_path)
    assert values(reopened) == [b"good"]
    reopened.close()


async def test_the_size_cap_refuses_instead_of_growing(tmp_path: Path) -> None:
    spool = opened(tmp_path, max_bytes=1 << 20)
    big = b"x" * (300 * 1024)
    for _ in range(3):
        await spool.append(b"k", big, [])
    assert not spool.has_room(len(big))
    with pytest.raises(SpoolFull):
        await spool.append(b"k", big, [])
    assert spool.events == 3
    spool.close()


def test_one_process_per_spool_directory(tmp_path: Path) -> None:
    first = opened(tmp_path)
    with pytest.raises(SpoolLocked):
        opened(tmp_path)
    first.close()
    opened(tmp_path).close()  # free again once the owner closed it


class ThreadRecordingSpool(Spool):
    """A real spool that notes which thread stores its checkpoint (an fsync, a rename
    and a directory fsync)."""

    checkpoint_threads: list[int]

    def _store_checkpoint(self, pos: Position) -> None:
        self.checkpoint_threads.append(threading.get_ident())
        super()._store_checkpoint(pos)


async def test_release_does_its_disk_io_off_the_event_loop(tmp_path: Path) -> None:
    # Issue 16, item 5: release() fsync'd the checkpoint on the event loop, stalling
    # every HTTP answer of the node for as long as the disk took.
    spool = ThreadRecordingSpool(tmp_path, 1 << 20, 1 << 20)
    spool.checkpoint_threads = []
    spool.open()
    for i in range(3):
        await spool.append(b"k", b"v%d" % i, [])
    await spool.release(spool.read(2))
    assert spool.checkpoint_threads, "release stored no checkpoint"
    assert threading.get_ident() not in spool.checkpoint_threads
    assert values(spool) == [b"v2"] and spool.events == 1
    spool.close()
    assert values(opened(tmp_path)) == [b"v2"]  # and durably so


async def test_a_checkpoint_the_disk_refuses_releases_nothing(tmp_path: Path) -> None:
    # A directory where the checkpoint is written aside: the same OSError a full or
    # failing disk gives. The release must fail whole, so the records are sent again.
    spool = opened(tmp_path)
    for i in range(3):
        await spool.append(b"k", b"v%d" % i, [])
    (tmp_path / "checkpoint.tmp").mkdir()
    with pytest.raises(IsADirectoryError):
        await spool.release(spool.read(2))
    assert spool.events == 3 and values(spool) == [b"v0", b"v1", b"v2"]
    (tmp_path / "checkpoint.tmp").rmdir()
    await spool.release(spool.read(2))
    assert spool.events == 1 and values(spool) == [b"v2"]
    spool.close()


# -- disk faults on real file systems (issue 16, finding 5 and "Disk faults") ---------


def disk_errors(stage: str, error: str) -> float:
    value: float = metrics.SPOOL_DISK_ERRORS.labels(stage, error)._value.get()
    return value


async def test_a_failed_write_that_cannot_be_cut_never_has_records_behind_it(
    tmp_path: Path,
) -> None:
    # Finding 5a. A write the full disk cut short left part of a record in the segment,
    # and the ftruncate meant to remove it failed too (the append-only attribute: the
    # kernel refuses the truncate, as a failing disk may). The next 202'd records were
    # appended behind that garbage, so the next open() cut them off with it.
    with small_tmpfs(tmp_path / "disk") as disk:
        spool = opened(disk / "spool")
        for i in range(3):
            await spool.append(b"k", b"before-%d" % i, [])
        [segment] = segments(disk / "spool")
        with capture_logs() as logs, append_only(segment):
            filler = fill(disk)
            # Larger than what is left of the segment's last page: part of it lands.
            with pytest.raises(OSError) as failed:
                await spool.append(b"k", b"x" * 16384, [])
            assert failed.value.errno == errno.ENOSPC
            assert segment.stat().st_size > spool._write_offset, "no garbage was left"
            filler.unlink()  # the disk is back; the garbage is still there
            for i in range(3):
                await spool.append(b"k", b"after-%d" % i, [])
            acknowledged = [b"before-%d" % i for i in range(3)] + [
                b"after-%d" % i for i in range(3)
            ]
            assert values(spool) == acknowledged
            # The drain reads past the sealed segment into the next one, and releases.
            await spool.release(spool.read(4))
            assert values(spool) == acknowledged[4:]
        assert disk_errors("truncate", "EPERM") >= 1
        assert any(e["event"].startswith("spool could not cut a failed write") for e in logs)
        spool.close()
        # What a restart finds: every acknowledged record not yet released, nothing else.
        again = opened(disk / "spool")
        assert values(again) == acknowledged[4:] and again.events == 2
        again.close()


async def test_a_rotation_the_disk_refuses_keeps_the_old_fd_and_closes_nothing_else(
    tmp_path: Path,
) -> None:
    # Finding 5b. Rotation closed the segment's fd before opening the next; the open
    # failed (no inode left: ENOSPC), and the stale fd number, reused by the kernel for
    # the next file anyone opened, was closed again by the next rotation.
    with small_tmpfs(tmp_path / "disk", inodes=32) as disk:
        spool = opened(disk / "spool", segment_bytes=64)
        await spool.append(b"k", b"first", [])
        await spool.append(b"k", b"x" * 64, [])  # the segment is full: the next rotates
        taken = use_up_inodes(disk)
        with pytest.raises(OSError) as failed:
            await spool.append(b"k", b"refused", [])
        assert failed.value.errno == errno.ENOSPC
        assert disk_errors("rotate", "ENOSPC") >= 1
        os.fstat(spool._write_fd)  # still open: the spool still owns it
        # Files opened meanwhile get the lowest free numbers, as a Kafka socket would.
        others = [os.open(tmp_path, os.O_RDONLY) for _ in range(16)]
        theirs = os.stat(tmp_path).st_ino
        try:
            for path in taken:
                path.unlink()
            await spool.append(b"k", b"after", [])
            for fd in others:
                # Before: one of these was closed by the spool and, the number being
                # free again, reopened as its new segment, so the owner's file was gone
                # and its close() would later take the spool's segment.
                assert os.fstat(fd).st_ino == theirs, "the spool closed someone else's file"
        finally:
            for fd in others:
                with contextlib.suppress(OSError):
                    os.close(fd)
        assert values(spool) == [b"first", b"x" * 64, b"after"]
        assert len(segments(disk / "spool")) == 2
        spool.close()
        again = opened(disk / "spool", segment_bytes=64)
        assert values(again) == [b"first", b"x" * 64, b"after"]
        again.close()


class WriterThreadSpool(Spool):
    """A real spool that notes which thread writes and fsyncs its appends."""

    write_threads: list[int]

    def _write(self, data: bytes) -> None:
        self.write_threads.append(threading.get_ident())
        super()._write(data)


async def test_appends_do_their_disk_io_off_the_event_loop(tmp_path: Path) -> None:
    # Finding 5c: verified, not changed. The write, the fsync and a rotation run in a
    # worker thread; only open() at start (before the listener) runs inline.
    spool = WriterThreadSpool(tmp_path, 1 << 20, 64)
    spool.write_threads = []
    spool.open()
    await asyncio.gather(*(spool.append(b"k", b"x" * 40, []) for _ in range(10)))
    await spool.append(b"k", b"after a rotation", [])
    assert spool.write_threads and threading.get_ident() not in spool.write_threads
    assert len(segments(tmp_path)) > 1
    spool.close()


async def test_a_full_disk_refuses_appends_and_checkpoints_and_heals_by_itself(
    tmp_path: Path,
) -> None:
    # "Disk faults": ENOSPC at append and at the checkpoint. Each append fails whole
    # (its request gets 503), nothing of it is left in the file, a checkpoint the
    # full disk refuses releases nothing, and both work again once space is freed.
    with small_tmpfs(tmp_path / "disk") as disk:
        spool = opened(disk / "spool")
        for i in range(3):
            await spool.append(b"k", b"kept-%d" % i, [])
        [segment] = segments(disk / "spool")
        filler = fill(disk)
        before = disk_errors("write", "ENOSPC")
        results = await asyncio.gather(
            *(spool.append(b"k", b"y" * 4096, []) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, OSError) and r.errno == errno.ENOSPC for r in results)
        assert disk_errors("write", "ENOSPC") > before
        # Readiness hears of it (the cap is far off): unready for a while, then tried.
        failed_at = spool.write_failed_at
        assert spool.has_room() and failed_at is not None
        assert not spool.takes_appends(failed_at + DISK_RETRY_SECONDS / 2)
        assert spool.takes_appends(failed_at + DISK_RETRY_SECONDS)
        assert segment.stat().st_size == spool._write_offset  # the failed part cut off
        assert spool.events == 3 and values(spool) == [b"kept-%d" % i for i in range(3)]
        assert spool.bytes == segment.stat().st_size

        with pytest.raises(OSError) as refused:
            await spool.release(spool.read(2))
        assert refused.value.errno == errno.ENOSPC
        assert disk_errors("checkpoint", "ENOSPC") >= 1
        assert spool.events == 3

        filler.unlink()
        await spool.append(b"k", b"healed", [])
        assert spool.write_failed_at is None and spool.takes_appends(0.0)
        await spool.release(spool.read(2))
        assert values(spool) == [b"kept-2", b"healed"]
        spool.close()
        cut = metrics.SPOOL_CORRUPT_BYTES._value.get()
        again = opened(disk / "spool")
        assert values(again) == [b"kept-2", b"healed"]
        assert metrics.SPOOL_CORRUPT_BYTES._value.get() == cut  # no garbage to cut
        again.close()


async def test_an_fsync_the_device_fails_answers_no_and_heals(tmp_path: Path) -> None:
    # "Disk faults" at fsync: a block device that cannot store the writes (a loop
    # device on a full tmpfs; the kernel reports ENOSPC at fsync, as thin-provisioned
    # storage does). write() succeeds into the page cache; the fsync fails, so the
    # append fails and its bytes are cut; freed, the device takes the next ones.
    with fsync_failing_disk(tmp_path) as (disk, backing):
        spool = opened(disk / "spool")
        await spool.append(b"k", b"kept", [])
        filler = fill(backing)
        before = disk_errors("fsync", "ENOSPC")
        with pytest.raises(OSError):
            await spool.append(b"k", os.urandom(256 * 1024), [])
        assert disk_errors("fsync", "ENOSPC") > before
        assert spool.events == 1 and values(spool) == [b"kept"]
        filler.unlink()
        await spool.append(b"k", b"healed", [])
        assert values(spool) == [b"kept", b"healed"]
        spool.close()
        again = opened(disk / "spool")
        assert values(again) == [b"kept", b"healed"]
        again.close()


async def test_a_torn_tail_the_disk_will_not_cut_is_sealed_not_appended_to(
    tmp_path: Path,
) -> None:
    # The same edge at start: open() could not truncate a torn tail (the kernel refuses
    # it) and so refused to start; appending behind the tail instead would lose those
    # records at the next open. Now the segment is sealed before the tail and appends
    # go to a new segment.
    with small_tmpfs(tmp_path / "disk") as disk:
        spool = opened(disk / "spool")
        for i in range(2):
            await spool.append(b"k", b"whole-%d" % i, [])
        spool.close()
        [segment] = segments(disk / "spool")
        torn = encode(b"k", b"never-acknowledged", [], 0)
        with segment.open("ab") as f:
            f.write(torn[: len(torn) // 2])
        with append_only(segment):
            again = opened(disk / "spool")
            assert values(again) == [b"whole-0", b"whole-1"]
            await again.append(b"k", b"after", [])
            assert values(again) == [b"whole-0", b"whole-1", b"after"]
            assert len(segments(disk / "spool")) == 2
            assert disk_errors("recover", "EPERM") >= 1
            again.close()
        last = opened(disk / "spool")  # the disk takes the cut now
        assert values(last) == [b"whole-0", b"whole-1", b"after"]
        last.close()
