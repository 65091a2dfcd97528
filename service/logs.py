"""structlog set-up: our own log lines and the stdlib loggers (uvicorn, aiokafka) end up
as the same JSON lines on stderr, or a readable console format for local play.

Our loggers write through structlog's WriteLogger directly: the access log runs once per
request, and skipping the stdlib logging machinery for it keeps the hot path lean. Each
module names itself with ``structlog.get_logger(logger_name="callstatus.<module>")``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Literal

import pydantic_core
import structlog
from structlog.typing import EventDict, Processor


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


def configure(level: str, fmt: Literal["json", "console"]) -> None:
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
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
