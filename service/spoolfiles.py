"""The spool's two small notes beside its segments, each a JSON file written durably
(aside, fsync'd, renamed, the directory fsync'd): ``checkpoint``, the first record not
yet released, and ``sending``, how far the batch the drainer was sending reaches and
when it was sent. Plus :func:`fsync_dir`, which makes a new file's name durable.

Why ``sending`` exists: if the process dies after Kafka acknowledged a drained batch but
before the checkpoint moved past it, the batch is still in the spool at the next start.
The note lets that start ask Kafka which of the batch it has, instead of sending it a
second time (service/drainer.py).

A note that is missing or unreadable reads as "none": a lost checkpoint re-sends what
the spool holds (at least once), never loses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT = "checkpoint"
SENDING = "sending"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record starts (or the one before it ends) in the spool's segments."""

    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class Sending:
    """What the drainer was sending when the process last stopped: the records from the
    checkpoint up to ``end`` may be in Kafka already (sent at ``at_ms`` and acknowledged,
    with the process gone before the checkpoint moved past them)."""

    end: Position
    at_ms: int


def load_checkpoint(directory: Path) -> Position:
    try:
        raw = json.loads((directory / CHECKPOINT).read_text())
        return Position(int(raw["segment"]), int(raw["offset"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return Position(0, 0)


def store_checkpoint(directory: Path, pos: Position) -> None:
    """Blocking (call it in a thread); raises OSError, leaving the old checkpoint."""
    _store_json(directory, CHECKPOINT, {"segment": pos.segment, "offset": pos.offset})


def load_sending(directory: Path, checkpoint: Position) -> Sending | None:
    """The last batch noted as being sent, when it reaches past ``checkpoint``."""
    try:
        raw = json.loads((directory / SENDING).read_text())
        sending = Sending(Position(int(raw["segment"]), int(raw["offset"])), int(raw["at_ms"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if (sending.end.segment, sending.end.offset) <= (checkpoint.segment, checkpoint.offset):
        return None  # all of it was released: nothing to ask
    return sending


def store_sending(directory: Path, note: Sending) -> None:
    """Blocking (call it in a thread); raises OSError, leaving the old note."""
    end = note.end
    _store_json(
        directory, SENDING, {"segment": end.segment, "offset": end.offset, "at_ms": note.at_ms}
    )


def _store_json(directory: Path, name: str, value: dict[str, int]) -> None:
    # Written aside and renamed: a crash leaves the old file or the new one.
    tmp = directory / f"{name}.tmp"
    with tmp.open("w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / name)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a new or renamed file's name) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
