"""Memory per tracked call: the processor's in-memory state dict, measured with
tracemalloc, for N calls. Run as ``python -m bench.memory N [N ...]`` (a process of its
own, so a million states leave no trace in the harness); prints one JSON object.

Each state is what the processor keeps for a whole lifecycle (queued, ringing,
inProgress, completed, each with a revision, as resource events carry): ``decide`` on
each event with its own eventId, then packed (service/statecodec.py) and stored under the
call's id, a string of its own per call. ``decide`` runs for the first 1,000 calls only,
before tracing starts (tracemalloc slows every allocation); every call then gets its own
packed copy of one of those states, so what is counted is exactly what is kept.
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta

from bench.data import call_id, webhook_body
from schemas.call import Call, CallStatus
from schemas.messages import normalise_body
from service.fsm import CallState, decide
from service.statecodec import pack

DECIDED = 1_000
MILLISECOND = timedelta(milliseconds=1)


def _call(status: CallStatus) -> Call:
    return normalise_body(json.loads(webhook_body(call_id("m", 0), status, 7)))[2]


def bytes_per_call(calls: int) -> float:
    steps = [
        _call(status).model_copy(update={"revision": revision})
        for revision, status in enumerate(
            (CallStatus.QUEUED, CallStatus.RINGING, CallStatus.IN_PROGRESS, CallStatus.COMPLETED),
            start=1,
        )
    ]
    lifecycles: list[CallState] = []
    for n in range(min(calls, DECIDED)):
        state = None
        now = datetime.now(UTC)
        for step in steps:
            state = decide(state, step, str(uuid.uuid4()), now + n * MILLISECOND).state
        assert state is not None
        lifecycles.append(state)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    states: dict[str, bytes] = {}
    for n in range(calls):
        states[call_id("m", n)] = pack(lifecycles[n % DECIDED])
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(states) == calls
    del states
    gc.collect()
    return used / calls


def main(argv: list[str]) -> int:
    print(json.dumps({n: bytes_per_call(int(n)) for n in argv}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
