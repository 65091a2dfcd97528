"""Memory per tracked call: the processor's in-memory state dict, measured with
tracemalloc, for N calls. Run as ``python -m bench.memory N [N ...]`` (a process of its
own, so a million states leave no trace in the harness); prints one JSON object.

Each state is built the way the processor builds it: the ingest record's ``call`` parsed
from its own JSON (distinct per call), ``decide`` on it, and the state stored under the
call's id; one processing time per batch of 500, as the processor stamps a batch.
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
import uuid
from datetime import UTC, datetime

from bench.data import call_id, webhook_body
from schemas.call import Call, CallStatus
from schemas.messages import normalise_body
from service.fsm import CallState, decide

BATCH = 500


def bytes_per_call(calls: int) -> float:
    _, _, template = normalise_body(
        json.loads(webhook_body(call_id("m", 0), CallStatus.RINGING, 7))
    )
    raw = template.to_json()
    placeholder = template.callId.encode()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    states: dict[str, CallState] = {}
    now = datetime.now(UTC)
    for n in range(calls):
        if n % BATCH == 0:
            now = datetime.now(UTC)
        call = Call.model_validate_json(raw.replace(placeholder, call_id("m", n).encode()))
        state = decide(None, call, str(uuid.uuid4()), now).state
        assert state is not None
        states[call.callId] = state
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
