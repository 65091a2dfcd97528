"""The spool's bytes on disk: how a record is encoded in a segment file, how segment
files are named, and reading records back from a position.

A record::

    u32 crc32(body) | u32 len(body) | body
    body = u64 received_ms | u16 len(key) | key | u8 n_headers
           | n x (u8 len(name) | name | u16 len(value) | value) | value

A crash mid-write leaves a partial or mismatching record at the end of a segment:
:func:`decode` says so (None) instead of guessing, and the spool cuts the segment there
(service/spool.py). The dead-letter directory stores each record in this same format
(service/deadletter.py).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.headers import Headers
from service.spoolfiles import Position

_HEAD = struct.Struct("<II")  # crc32, body length
_BODY_HEAD = struct.Struct("<QH")  # received_ms, key length
SEGMENT_SUFFIX = ".seg"
# No single record is bigger (a body is capped far below this): a larger length field
# can only be garbage.
MAX_RECORD_BYTES = 64 * 1024 * 1024


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


def received_ms_of(record: bytes) -> int:
    """The received time of an :func:`encode`-d record."""
    received_ms: int = _BODY_HEAD.unpack_from(record, _HEAD.size)[0]
    return received_ms


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


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:012d}{SEGMENT_SUFFIX}"


def segment_numbers(directory: Path) -> list[int]:
    """The numbers of the segment files in ``directory``, in order."""
    return sorted(
        int(p.name[: -len(SEGMENT_SUFFIX)])
        for p in directory.glob(f"*{SEGMENT_SUFFIX}")
        if p.name[: -len(SEGMENT_SUFFIX)].isdigit()
    )


def read_records(
    directory: Path,
    pos: Position,
    durable: Position,
    segment_end: Callable[[int], int],
    max_records: int,
    max_bytes: int,
) -> list[SpooledRecord]:
    """Up to ``max_records`` records (and about ``max_bytes``) from ``pos`` on, never
    past ``durable`` (the end of what is fsync'd); ``segment_end`` says where the records
    of a segment before the durable one end. Blocking file reads. Raises OSError where
    a record that was checked when written (or at open) no longer decodes."""
    out: list[SpooledRecord] = []
    size = 0
    while len(out) < max_records and size < max_bytes:
        if pos.segment == durable.segment:
            limit = durable.offset
        elif pos.segment < durable.segment:
            limit = segment_end(pos.segment)
        else:
            break
        if pos.offset >= limit:
            if pos.segment == durable.segment:
                break
            pos = Position(pos.segment + 1, 0)
            continue
        with segment_path(directory, pos.segment).open("rb") as f:
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
