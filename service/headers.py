"""Kafka record headers as the service passes them around: the one ``Headers`` type
(ingest, the spool, the drainer and the dead letters all carry the same pairs), and
reading an event's eventId from them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

Headers: TypeAlias = Sequence[tuple[str, bytes]]


def event_id_of(headers: Headers) -> str | None:
    """The eventId a record carries in its ``ce_id`` header (ingest always sets it)."""
    for name, value in headers:
        if name == "ce_id":
            return value.decode(errors="replace")
    return None
