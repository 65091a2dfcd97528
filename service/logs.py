"""structlog set-up: our own log lines and the stdlib loggers (uvicorn, aiokafka) end up
as the same JSON lines on stderr, or a readable console format for local play.

Our loggers write through structlog's WriteLogger directly: skipping the stdlib logging
machinery keeps them lean. Each module names itself with
``structlog.get_logger(logger_name="callstatus.<module>")``.

The access log writes one line per request, so it has a faster way still
(:func:`fast_lines`): the same line, handed to the configured renderer at once instead
of through structlog's processor chain, which cost about a tenth of a request's CPU;
and for the plain console format, written straight from its fields without an event
dict (``FastLines._console_line``, held to :func:`plain_console` by a property test).
And every line goes through one :class:`LineWriter`, which a running server lets write
a pass of the event loop's lines at once (:func:`batch_lines`) instead of one write(2)
per request.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, cast

import pydantic_core
import structlog
from structlog.typing import EventDict, Processor

from service.linewriter import LineWriter


def _stdlib_name(_: object, __: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    if record is not None:
        event_dict["logger_name"] = record.name
    return event_dict


def _dumps(obj: object, **_: object) -> str:
    # pydantic-core's encoder: several times faster than json.dumps for a log line.
    return pydantic_core.to_json(obj, fallback=repr).decode()


class Repeats(logging.Filter):
    """Of the loggers under ``prefix``, let one line per (logger, level, message
    template) through per ``window`` seconds, and say on the next one let through how
    many were held back.

    With the broker away, aiokafka logs the same warnings (metadata, connection refused)
    several times a second per client for as long as the outage lasts: thousands of
    lines that bury ours and cost a log pipeline money, while one a minute says it all.
    """

    def __init__(
        self, prefix: str, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.window = window
        self.clock = clock
        self._seen: dict[tuple[str, int, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = (record.name, record.levelno, record.msg)
        now = self.clock()
        shown_at, held = self._seen.get(key, (None, 0))
        if shown_at is not None and now - shown_at < self.window:
            self._seen[key] = (shown_at, held + 1)
            return False
        if len(self._seen) > 1000:  # templates, not messages: only a runaway gets here
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self.window:.0f} s)"
        return True


# A console value that would read ambiguously bare: structlog's ConsoleRenderer quotes it.
_QUOTED = re.compile(r"[ \t=\r\n\"']")
# A column's key absent from the event dict (present but None is shown, as "None").
_MISSING = object()


def _needs_quotes(text: str) -> bool:
    """Whether ``text`` holds a character of :data:`_QUOTED`: seven substring searches,
    which run at memchr's speed, against the regex's charset test of every character
    (~6,000 of the ~40,000 instructions a console access line took)."""
    return (
        " " in text
        or "=" in text
        or '"' in text
        or "'" in text
        or "\t" in text
        or "\n" in text
        or "\r" in text
    )


def _console_value(value: object) -> str:
    if isinstance(value, str) and not _QUOTED.search(value):
        return value
    return repr(value)


def plain_console(_: object, __: str, event_dict: EventDict) -> str:
    """The console format when stderr is no terminal (a file, a pipe, a container's
    log): the layout of structlog's ``ConsoleRenderer(colors=False)``: timestamp,
    ``[level]``, the event padded to 30, ``[logger_name]``, then ``key=value`` by key,
    and an exception's text below. Ours because the access line is written for every
    request: structlog's builds each column through a formatter object and a StringIO,
    ~18 µs a line against ~4 here, a sixth of a request's CPU (bench/README.md)."""
    stack = event_dict.pop("stack", None)
    exception = event_dict.pop("exception", None)
    head = []
    # A key that is present is shown even when it holds None, as structlog's columns do.
    timestamp = event_dict.pop("timestamp", _MISSING)
    if timestamp is not _MISSING and str(timestamp):  # an empty column is left out
        head.append(str(timestamp))
    level = event_dict.pop("level", _MISSING)
    if level is not _MISSING:
        head.append(f"[{level!s:<9}]")
    event = event_dict.pop("event", _MISSING)
    if event is not _MISSING:
        head.append(f"{event!s:<30}")
    for key in ("logger", "logger_name"):
        logger = event_dict.pop(key, _MISSING)
        if logger is not _MISSING:
            head.append(f"[{logger}]")
    head.extend(f"{key}={_console_value(event_dict[key])}" for key in sorted(event_dict))
    text = " ".join(head).rstrip(" ")
    if stack is not None:
        text += "\n" + str(stack)
        if exception is not None:
            text += "\n\n" + "=" * 79 + "\n"
    if exception is not None:
        text += "\n" + str(exception)
    return text


# The keys plain_console places in the line's head or below it, not among the key=value
# pairs: fields holding one are rendered the long way.
_HEAD_KEYS = frozenset(
    {"timestamp", "level", "event", "logger", "logger_name", "stack", "exception"}
)
# Key sets whose console order FastLines remembers: the access line's few (keys are ours,
# never a request's); past this, a new set is sorted every time rather than remembered.
_ORDERS_KEPT = 256


class FastLines:
    """The lines of :func:`configure`, one written without structlog's processor chain:
    the event dict the chain would have built (the logger's bound ``logger_name``, the
    call's fields, ``event``, structlog's context variables, ``level``, ``timestamp``,
    in that order), rendered by the same renderer (JSON, or the console's), so a reader
    cannot tell the two apart."""

    def __init__(
        self, writer: LineWriter, processors: list[Processor], renderer: Processor
    ) -> None:
        self.writer = writer
        # What structlog must still be configured with for these lines to be the ones it
        # would write (tests swap the chain for structlog.testing.capture_logs).
        self.processors = processors
        self.renderer = renderer
        self._second = -1
        self._prefix = ""
        # The console's order of each set of fields' keys seen (_console_line).
        self._orders: dict[tuple[str, ...], tuple[str, ...]] = {}

    def info(self, logger_name: str, event: str, fields: dict[str, Any]) -> None:
        if self.renderer is plain_console:
            text = self._console_line(logger_name, event, fields)
            if text is not None:
                self.writer.queue(text)
                return
        line: dict[str, Any] = {"logger_name": logger_name, **fields, "event": event}
        structlog.contextvars.merge_contextvars(None, "info", line)
        line["level"] = "info"
        line["timestamp"] = self._timestamp()
        # Both renderers configure() builds return text.
        self.writer.queue(cast(str, self.renderer(None, "info", line)) + "\n")

    def _console_line(self, logger_name: str, event: str, fields: dict[str, Any]) -> str | None:
        """What :func:`plain_console` renders of this line, written straight from the
        fields: its head is fixed but for the time, and the keys' order is known once
        their set is (the event dict, its pops and its sort cost ~3 us a line of the
        access log's). None when that does not hold: a field named like a head column,
        or context variables bound (:func:`info` renders those the long way). The keys
        must be plain ``str`` (the access log's literals): the remembered orders are
        found by equality, which would take ``True`` for ``1`` or a ``str`` enum member
        for its value."""
        keys = tuple(fields)
        order = self._orders.get(keys)
        if order is None:
            if _HEAD_KEYS.intersection(keys):
                return None
            order = tuple(sorted(keys))
            if len(self._orders) < _ORDERS_KEPT:
                self._orders[keys] = order
        if structlog.contextvars.get_contextvars():
            return None
        head = f"{self._timestamp()} [info     ] {event!s:<30} [{logger_name!s}]"
        # Each text value bare, checked once for what would make plain_console quote it,
        # all of them together rather than one search per value: a line's texts almost
        # never need quotes.
        pairs = [head]
        texts = []
        for key in order:
            value = fields[key]
            if type(value) is str:
                texts.append(value)
                pairs.append(f"{key}={value}")
            else:
                pairs.append(f"{key}={_console_value(value)}")
        if _needs_quotes("".join(texts)):
            pairs[1:] = [f"{key}={_console_value(fields[key])}" for key in order]
        return " ".join(pairs).rstrip(" ") + "\n"

    def _timestamp(self) -> str:
        """What TimeStamper(fmt="iso", utc=True) writes, with the date and time of day
        formatted once a second rather than a datetime built and formatted per line."""
        micros = time.time_ns() // 1000  # datetime.now() floors to the microsecond too
        second, fraction = divmod(micros, 1_000_000)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        # datetime.isoformat() leaves out a fraction of zero.
        return f"{self._prefix}.{fraction:06d}Z" if fraction else f"{self._prefix}Z"


# Set by configure() for a level of INFO or below.
_fast_lines: FastLines | None = None
_writer: LineWriter | None = None


def fast_lines() -> FastLines | None:
    """The fast lines, while structlog is configured as :func:`configure` left it (None
    above INFO, or while a test captures the logs): callers then log through structlog
    as usual."""
    lines = _fast_lines
    if lines is None:
        return None
    processors = structlog.get_config()["processors"]
    if processors is not lines.processors or processors[-1] is not lines.renderer:
        return None
    return lines


def batch_lines() -> None:
    """Write queued lines once per event-loop pass from now on (the running server)."""
    if _writer is not None:
        _writer.batching = True


def _flush_at_exit() -> None:
    if _writer is not None:
        with contextlib.suppress(ValueError, OSError):  # the stream may be closed already
            _writer.flush()


atexit.register(_flush_at_exit)


def configure(level: str, fmt: Literal["json", "console"]) -> None:
    global _fast_lines, _writer
    if _writer is not None:
        with contextlib.suppress(ValueError, OSError):
            _writer.flush()
    writer = _writer = LineWriter(sys.stderr)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    elif sys.stderr.isatty():  # someone reading it live: structlog's, in colour
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        renderer = plain_console
    processors: list[Processor] = [*shared, structlog.processors.format_exc_info, renderer]
    structlog.configure(
        processors=processors,
        logger_factory=structlog.WriteLoggerFactory(file=writer),  # type: ignore[arg-type]
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        cache_logger_on_first_use=False,
    )
    level_number = logging.getLevelNamesMapping()[level]
    _fast_lines = FastLines(writer, processors, renderer) if level_number <= logging.INFO else None
    handler = logging.StreamHandler(writer)
    # On the handler, not the logger: a logger's filters miss its children's records.
    handler.addFilter(Repeats("aiokafka"))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, _stdlib_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Our access log replaces uvicorn's; its error logger still flows through here.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # aiokafka is chatty at INFO about every (re)connection and rebalance step, and
    # repeats its warnings several times a second while a broker is away.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
