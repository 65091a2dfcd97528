"""The log set-up's own logic: repeated library warnings are held back, not lost."""

from __future__ import annotations

import logging

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
