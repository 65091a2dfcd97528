"""Realistic FreeClimb callback traffic for ``callstatus simulate``, as pure functions.

A call's callbacks follow FreeClimb's real order (docs/freeclimb.md section
2): an inbound call starts with ``inboundCall`` (ringing), an outbound API call with
``outDialStart`` (queued, then ringing), an answered call goes inProgress
(``outDialApiConnect``, ``getDigits``), and every call ends with one ``callStatus``
callback carrying its ``callEndedReason``. On top of that, what section 4 says a
receiver must plan for, each at a configurable share of calls or deliveries:

- gaps: a middle step never arrives (queued -> completed);
- reordering: two neighbouring callbacks arrive the other way round;
- duplicates: the same callback delivered twice (several FreeClimb nodes);
- retries: the same callback again because its answer was lost;
- illegal steps: a second, different end status after the call ended.

Each call's :class:`Plan` also keeps its true lifecycle (what FreeClimb's REST API shows,
the FreeClimb API stand-in serves it during ``callstatus simulate``), and
:func:`withheld` picks the callbacks ``--lost`` never sends.

What becomes of the callbacks is predicted by service/oracle.py, over each call's
callbacks in sending order: the order the processor sees them in, since one call's
callbacks are sent one after the other.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from enum import StrEnum

from schemas.call import CallStatus
from service.fsm import TERMINAL

S = CallStatus


class Kind(StrEnum):
    """Why a delivery is in the plan."""

    STEP = "step"  # a step of the lifecycle, in order
    LATE = "late"  # a step that swapped places with the one after it
    DUPLICATE = "duplicate"
    RETRY = "retry"
    ILLEGAL = "illegal"


@dataclass(frozen=True, slots=True)
class Step:
    request_type: str
    status: CallStatus
    ended_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Lifecycle:
    name: str
    direction: str
    weight: int
    steps: tuple[Step, ...]


def _end(status: CallStatus, reason: str) -> Step:
    return Step("callStatus", status, reason)


_RING_IN = Step("inboundCall", S.RINGING)
_QUEUED = Step("outDialStart", S.QUEUED)
_RING_OUT = Step("outDialStart", S.RINGING)

# How calls go, and how often (weights): most calls are answered.
LIFECYCLES: tuple[Lifecycle, ...] = (
    Lifecycle(
        "inbound answered",
        "inbound",
        40,
        (_RING_IN, Step("getDigits", S.IN_PROGRESS), _end(S.COMPLETED, "farEndHangup")),
    ),
    Lifecycle(
        "inbound hung up while ringing", "inbound", 5, (_RING_IN, _end(S.CANCELED, "callCanceled"))
    ),
    Lifecycle(
        "outbound answered",
        "outboundAPI",
        30,
        (
            _QUEUED,
            _RING_OUT,
            Step("outDialApiConnect", S.IN_PROGRESS),
            _end(S.COMPLETED, "appHangup"),
        ),
    ),
    Lifecycle("outbound busy", "outboundAPI", 8, (_QUEUED, _RING_OUT, _end(S.BUSY, "busy"))),
    Lifecycle(
        "outbound not answered",
        "outboundAPI",
        10,
        (_QUEUED, _RING_OUT, _end(S.NO_ANSWER, "noAnswer")),
    ),
    Lifecycle("outbound failed", "outboundAPI", 4, (_QUEUED, _end(S.FAILED, "failed"))),
    Lifecycle(
        "outbound canceled",
        "outboundAPI",
        3,
        (_QUEUED, _RING_OUT, _end(S.CANCELED, "callCanceled")),
    ),
)


@dataclass(frozen=True, slots=True)
class Shares:
    """Fractions (0..1): gaps, reorder and illegal per call; duplicates and retries per
    callback."""

    gaps: float = 0.10
    reorder: float = 0.05
    duplicates: float = 0.03
    retries: float = 0.03
    illegal: float = 0.02

    def __post_init__(self) -> None:
        for name in ("gaps", "reorder", "duplicates", "retries", "illegal"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One callback to POST: its body (signed when sent) and why it is there."""

    call_id: str
    status: CallStatus
    kind: Kind
    body: bytes


def _hex(rng: random.Random, n: int) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


def _phone(rng: random.Random) -> str:
    return f"+1312{rng.randrange(10**7):07d}"


def callback_body(
    request_type: str,
    call_id: str,
    account_id: str,
    status: CallStatus,
    direction: str,
    ends: tuple[str, str],
    **extra: object,
) -> bytes:
    """A FreeClimb callback body with the fields FreeClimb sends (keys as in its SDK's
    example), ``extra`` after them; ``ends`` is (from, to). Shared with the benchmark's
    traffic (bench/data.py)."""
    caller, callee = ends
    fields: dict[str, object] = {
        "accountId": account_id,
        "callId": call_id,
        "callStatus": status.value,
        "conferenceId": None,
        "direction": direction,
        "from": caller,
        "parentCallId": None,
        "queueId": None,
        "requestType": request_type,
        "to": callee,
        **extra,
    }
    return json.dumps(fields, separators=(",", ":")).encode()


def _body(
    step: Step,
    call_id: str,
    account_id: str,
    lifecycle: Lifecycle,
    ends: tuple[str, str],
    duration: int,
) -> bytes:
    """One step's callback; the end carries its reason, and a completed call its length."""
    extra: dict[str, object] = {}
    if step.ended_reason is not None:
        extra["callEndedReason"] = step.ended_reason
        if step.status is S.COMPLETED:
            extra["callDuration"] = duration
    return callback_body(
        step.request_type, call_id, account_id, step.status, lifecycle.direction, ends, **extra
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """One call as it truly goes (``truth``: its statuses in FreeClimb's order, what
    FreeClimb's REST API shows as time goes, the last one its final status) and the
    callbacks planned for it, faults included, in sending order."""

    call_id: str
    account_id: str
    direction: str
    ends: tuple[str, str]  # (from, to)
    truth: tuple[CallStatus, ...]
    deliveries: list[Delivery]

    @property
    def final(self) -> CallStatus:
        return self.truth[-1]


def plan_call(rng: random.Random, shares: Shares, account_id: str | None = None) -> Plan:
    """One new call's :class:`Plan`, for ``account_id``, else for a random account."""
    lifecycle = rng.choices(LIFECYCLES, weights=[lc.weight for lc in LIFECYCLES])[0]
    # The random account is drawn either way: a seed plans the same calls for any account.
    call_id, drawn = "CA" + _hex(rng, 40), "AC" + _hex(rng, 40)
    account_id = account_id or drawn
    ends = (_phone(rng), _phone(rng))
    duration = rng.randrange(5, 600)
    steps = [(step, Kind.STEP) for step in lifecycle.steps]

    if len(steps) > 2 and rng.random() < shares.gaps:
        del steps[rng.randrange(1, len(steps) - 1)]  # never the first or the end
    if rng.random() < shares.reorder:
        i = rng.randrange(len(steps) - 1)
        steps[i], steps[i + 1] = steps[i + 1], (steps[i][0], Kind.LATE)
    if rng.random() < shares.illegal:
        final = lifecycle.steps[-1].status
        other = rng.choice(sorted(TERMINAL - {final}))
        steps.append((_end(other, "appReject"), Kind.ILLEGAL))

    out: list[Delivery] = []
    for step, kind in steps:
        body = _body(step, call_id, account_id, lifecycle, ends, duration)
        out.append(Delivery(call_id, step.status, kind, body))
        if rng.random() < shares.duplicates:
            out.append(Delivery(call_id, step.status, Kind.DUPLICATE, body))
        if rng.random() < shares.retries:
            out.append(Delivery(call_id, step.status, Kind.RETRY, body))
    truth = tuple(step.status for step in lifecycle.steps)
    return Plan(call_id, account_id, lifecycle.direction, ends, truth, out)


def generate_call(
    rng: random.Random, shares: Shares, account_id: str | None = None
) -> list[Delivery]:
    """The callbacks of one new call, in the order they will be sent; for
    ``account_id``, else for a random account."""
    return plan_call(rng, shares, account_id).deliveries


def generate_plans(
    calls: int, shares: Shares, seed: int | None = None, account_id: str | None = None
) -> list[Plan]:
    """The :class:`Plan` of ``calls`` calls (as :func:`generate_calls` draws them)."""
    rng = random.Random(seed)  # noqa: S311 - traffic shapes, not secrets
    return [plan_call(rng, shares, account_id) for _ in range(calls)]


def withheld(plans: list[Plan], lost: float, seed: int | None = None) -> frozenset[bytes]:
    """The callbacks ``--lost`` withholds at the source: each callback of a call's true
    lifecycle (a step, late or not) with probability ``lost``, with all its copies (a
    duplicate, a retry: FreeClimb never sent it at all). Drawn from a generator of its
    own, so the same seed plans the same traffic whatever ``lost`` is."""
    if not 0.0 <= lost <= 1.0:
        raise ValueError("lost must be between 0 and 1")
    rng = random.Random(None if seed is None else f"lost-{seed}")  # noqa: S311
    out: set[bytes] = set()
    for plan in plans:
        for delivery in plan.deliveries:
            if delivery.kind in (Kind.STEP, Kind.LATE) and rng.random() < lost:
                out.add(delivery.body)
    return frozenset(out)


def generate_calls(
    calls: int, shares: Shares, seed: int | None = None, account_id: str | None = None
) -> list[list[Delivery]]:
    """The deliveries of ``calls`` calls, one list per call, all for ``account_id`` when
    given (an accounts file binds each request to its account), else each call for a
    random account."""
    return [plan.deliveries for plan in generate_plans(calls, shares, seed, account_id)]
