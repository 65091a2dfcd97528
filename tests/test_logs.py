"""The log set-up's own logic: repeated library warnings are held back, not lost; the
access log's fast JSON line is the line structlog writes; batched lines keep their
order."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from service import logs
from service.linewriter import LineWriter
from service.logs import Repeats


def _record(name: str, msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_a_repeated_warning_shows_once_per_window_then_says_how_many_were_held() -> None:
    now = [0.0]
    repeats = Repeats("aiokafka", window=60, clock=lambda: now[0])
    shown = []
    for second in range(0, 150, 1):  # one line a second for two and a half minutes
        now[0] = float(second)
        record = _record("aiokafka.cluster", "Unable to update metadata from %s")
        if repeats.filter(record):
            shown.append((second, record.getMessage() if record.args else record.msg))
    assert [at for at, _ in shown] == [0, 60, 120]
    assert shown[0][1] == "Unable to update metadata from %s"
    assert shown[1][1].endswith("(59 more like this in the last 60 s)")


def test_other_templates_levels_and_loggers_are_counted_apart() -> None:
    repeats = Repeats("aiokafka", window=60, clock=lambda: 0.0)
    assert repeats.filter(_record("aiokafka.cluster", "a"))
    assert repeats.filter(_record("aiokafka.cluster", "b"))
    assert repeats.filter(_record("aiokafka.cluster", "a", logging.ERROR))
    assert repeats.filter(_record("aiokafka.conn", "a"))
    assert not repeats.filter(_record("aiokafka.cluster", "a"))
    # Our own loggers (and uvicorn's) are never held back.
    assert all(repeats.filter(_record("callstatus.processor", "same")) for _ in range(5))


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_batched_lines_go_out_together_at_the_end_of_the_loop_pass_in_order() -> None:
    stream = CountingStream()
    writer = LineWriter(stream)
    writer.batching = True
    writer.queue("a\n")
    writer.queue("b\n")
    assert stream.getvalue() == ""  # held until the pass ends
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert (stream.getvalue(), stream.writes) == ("a\nb\n", 1)
    writer.queue("c\n")
    writer.write("warning\n")  # any other line first writes what is queued
    assert stream.getvalue() == "a\nb\nc\nwarning\n"


def test_without_batching_or_a_loop_a_queued_line_is_written_at_once() -> None:
    stream = CountingStream()
    writer = LineWriter(stream)
    writer.queue("a\n")
    writer.batching = True
    writer.queue("b\n")  # no running loop: nobody would flush it later
    assert stream.getvalue() == "a\nb\n"


def test_the_fast_access_line_is_the_line_structlog_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.configure("INFO", "json")
    try:
        fields = {"method": "POST", "status": 202, "latency_ms": 0.5, "errors": [{"f": "x"}]}
        structlog.get_logger(logger_name="callstatus.http").bind().info("request", **fields)
        lines = logs.fast_lines()
        assert lines is not None
        lines.info("callstatus.http", "request", fields)
        with structlog.testing.capture_logs():
            assert logs.fast_lines() is None  # a test capturing: through structlog
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert logs.fast_lines() is None  # configured otherwise now
    slow, fast = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(slow) == list(fast)  # same keys, same order
    for line in (slow, fast):  # TimeStamper(fmt="iso", utc=True)'s form
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", line.pop("timestamp"))
    assert slow == fast


def test_the_fast_access_line_is_the_console_line_structlog_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()  # not a terminal: no colours
    monkeypatch.setattr(sys, "stderr", stream)
    logs.configure("INFO", "console")
    try:
        fields = {"method": "POST", "status": 202, "callId": "CA1", "outcome": "accepted"}
        structlog.get_logger(logger_name="callstatus.http").bind().info("request", **fields)
        lines = logs.fast_lines()
        assert lines is not None
        lines.info("callstatus.http", "request", fields)
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    slow, fast = stream.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z "
    assert re.match(stamp, slow) and re.match(stamp, fast)
    assert slow.split(" ", 1)[1] == fast.split(" ", 1)[1]
    assert "callId=CA1" in fast and "[callstatus.http]" in fast


@pytest.mark.parametrize(
    "event_dict",
    [
        {"event": "request", "level": "info", "timestamp": "2026-12-01T18:00:00Z",
         "logger_name": "callstatus.http", "status": 202, "latency_ms": 0.25,
         "callId": "CA1", "outcome": "accepted"},
        {"event": "refused", "level": "warning", "logger_name": "callstatus.http",
         "errors": [{"field": "callStatus", "message": "bad"}], "detail": "two words",
         "quote": "it's", "eq": "a=b", "empty": "", "none": None, "flag": True},
        {"event": "an event name longer than thirty characters", "level": "error",
         "exception": "Traceback (most recent call last):\n  ...\nValueError: x"},
        {"event": "stack", "stack": "Stack (most recent call last):\n  ...",
         "exception": "ValueError: x", "logger": "aiokafka", "n": 1},
        {"event": "", "level": "critical"},
        {"event": None, "timestamp": None, "logger": None, "level": "info"},
        {"event": "e", "timestamp": "", "level": "debug", "x": None},
    ],
)  # fmt: skip
def test_the_plain_console_line_has_structlogs_console_layout(
    event_dict: dict[str, object],
) -> None:
    """Our renderer for console logs off a terminal writes what structlog's
    ConsoleRenderer(colors=False) writes, column for column (it is only faster)."""
    ours = logs.plain_console(None, "info", dict(event_dict))
    theirs = structlog.dev.ConsoleRenderer(colors=False)(None, "info", dict(event_dict))
    assert ours == theirs


_VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["POST", "/v1/call-status", "a b", "it's", "a=b", 'say "hi"', "tab\t", ""]),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# Keys the access line uses, a few of plain_console's head columns, and any others.
_KEYS = st.one_of(
    st.sampled_from(["method", "path", "status", "latency_ms", "request_id", "callId"]),
    st.sampled_from(["event", "level", "timestamp", "logger", "logger_name", "stack"]),
    st.text(min_size=1, max_size=8),
)


@given(
    st.dictionaries(_KEYS, _VALUES, max_size=8),
    st.sampled_from(["request", "a long event name, past thirty characters"]),
)
def test_the_console_access_line_is_plain_consoles_line(
    fields: dict[str, object], event: str
) -> None:
    """The access line written straight from its fields (FastLines._console_line) is
    the line plain_console renders of the event dict structlog's chain would build; or
    it steps aside (None) for a field the template cannot place."""
    lines = logs.FastLines(LineWriter(io.StringIO()), [], logs.plain_console)
    stamp = "2026-12-01T18:00:00.000001Z"
    lines._timestamp = lambda: stamp  # type: ignore[method-assign]
    for _ in range(2):  # the first renders with the key order sorted, the second remembered
        fast = lines._console_line("callstatus.http", event, fields)
        event_dict = {"logger_name": "callstatus.http", **fields, "event": event}
        event_dict.update(level="info", timestamp=stamp)
        if fast is None:
            assert logs._HEAD_KEYS.intersection(fields)
        else:
            assert fast == logs.plain_console(None, "info", event_dict) + "\n"


@given(st.text(alphabet=st.sampled_from(" \t=\r\n\"'ab\u00e9\u2028")))
def test_needs_quotes_finds_what_the_console_quotes(text: str) -> None:
    assert logs._needs_quotes(text) is bool(logs._QUOTED.search(text))


def test_the_console_access_line_renders_bound_context_variables_the_long_way() -> None:
    stream = io.StringIO()
    lines = logs.FastLines(LineWriter(stream), [], logs.plain_console)
    structlog.contextvars.bind_contextvars(node="ingest-0")
    try:
        lines.info("callstatus.http", "request", {"status": 202})
    finally:
        structlog.contextvars.clear_contextvars()
    lines.info("callstatus.http", "request", {"status": 202})
    bound, unbound = stream.getvalue().splitlines()
    assert bound.endswith("[callstatus.http] node=ingest-0 status=202")
    assert unbound.endswith("[callstatus.http] status=202")


def test_console_logs_off_a_terminal_use_the_plain_renderer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    logs.configure("INFO", "console")
    try:
        assert structlog.get_config()["processors"][-1] is logs.plain_console
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
