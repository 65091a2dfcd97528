"""The one percentile definition, for ``callstatus simulate``'s summary and the
benchmark's latency figures, so the two report the same thing by the same name."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` from 0 to 100): the smallest value with at least
    ``p`` percent of the values at or below it; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil without floats' rounding surprises
    return ordered[int(rank) - 1]
