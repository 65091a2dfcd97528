"""What the garbage collector need not walk again: the long-lived heap of a started node.

What a process holds once a part of it has started (modules, pydantic's validators, the
Kafka clients, the app) lives as long as the process. CPython's full collections walk
every tracked object each time, and a busy node's young objects keep triggering them:
walking that start-up heap was ~8 % of the processor's CPU (about 3 µs per event) and
~5 µs per ingest request (bench/README.md). ``gc.freeze()`` moves it out of their way.

Each part freezes once per process, at the point where it is fully started: freezing
again later (at every rebalance, say) would also freeze a batch's short-lived objects,
which then could never be collected. (A node that started without Kafka, its spool taking
the webhooks meanwhile, freezes when Kafka is first reached, mid-traffic: what is in
flight then is frozen too, once, a bounded few requests' worth.)
"""

from __future__ import annotations

import gc

_frozen: set[str] = set()


def freeze_once(part: str) -> bool:
    """Freeze what the process holds now, the first time ``part`` says it has started;
    whether this call froze."""
    if part in _frozen:
        return False
    _frozen.add(part)
    # Collected first: cyclic garbage not yet found (a failed start attempt's client,
    # say) would otherwise be frozen with the rest and never freed.
    gc.collect()
    gc.freeze()
    return True
