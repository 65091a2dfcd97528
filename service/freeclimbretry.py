"""When the FreeClimb REST API client sends again: ``Retry-After`` read (RFC 9110), capped
exponential backoff with jitter, and the choice between them. Pure arithmetic; the random
value and the current time are the caller's."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

_DELAY_SECONDS: Final = re.compile(r"[0-9]{1,10}", re.ASCII)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110 10.2.3): delay-seconds, or an
    HTTP date (IMF-fixdate, or the obsolete RFC 850 and asctime forms) measured from
    ``now``, 0 when already past. None when absent or not understood: the caller then
    falls back on its own backoff."""
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime and "-0000" dates: HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_delay(attempt: int, random_value: float, *, first: float, cap: float) -> float:
    """The wait before retry number ``attempt`` (0 for the first retry): ``first`` doubling
    up to ``cap``, with "equal jitter" (half fixed, half ``random_value`` in [0, 1) of it),
    the shape of service/backoff.py, so clients that met the same 429 do not come back in
    step."""
    base = min(cap, first * float(2 ** min(attempt, 62)))
    return base / 2 + random_value * (base / 2)


def retry_delay(
    attempt: int, random_value: float, retry_after: float | None, *, first: float, cap: float
) -> float:
    """The wait before a retry: what ``Retry-After`` asked, when it asked, plus up to 10 %
    (at most 1 s) of jitter so that a fleet told the same second does not return at that
    very instant; else :func:`backoff_delay`."""
    if retry_after is None:
        return backoff_delay(attempt, random_value, first=first, cap=cap)
    return retry_after + random_value * min(1.0, retry_after * 0.1)
