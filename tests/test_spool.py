"""The spool on a real file system: durable appends in groups, order, release across
restarts, the size cap, one owner, a torn tail cut off and reported, a checkpoint the
disk refuses, and no disk I/O of release on the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from service import metrics
from service.spool import Position, Spool, SpoolFull, SpoolLocked, encode


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
