"""Each part freezes the heap once per process: a second start (a rebalance, a
reconnect) must not freeze what is short-lived by then."""

from __future__ import annotations

import gc

import pytest

from service import heap


def test_each_part_freezes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_frozen", set())
    try:
        assert heap.freeze_once("a")
        frozen = gc.get_freeze_count()
        held = [[n] for n in range(1000)]  # tracked objects made after the first freeze
        # Compared by half of what is new, not exactly: a frozen object another thread
        # frees meanwhile (pytest-xdist's, in a worker) leaves the count.
        assert not heap.freeze_once("a")
        assert gc.get_freeze_count() < frozen + len(held) // 2  # the second froze nothing
        assert heap.freeze_once("b")  # another part: its own freeze, of what is new
        assert gc.get_freeze_count() > frozen + len(held) // 2
    finally:
        gc.unfreeze()  # the rest of the test run as before
