"""The books of a ``callstatus simulate`` run: what was sent and what came back
(:class:`Run`), the state machine's prediction for every accepted request
(:func:`predict`, by service/oracle.py), the :class:`Tally` of each against what was read
back (:func:`judge`), and the summary table printed at the end (:func:`summary`).

The exact prediction holds for a call only while the processor saw nothing but its
callbacks. Once a Call resource fetched from FreeClimb's REST API (source ``api``) moved
a call, its later callbacks may be duplicates of a status the resource brought, so such
a call (and one with an attempt that may have been ingested unanswered) is judged by
what must hold whatever the order: each accepted callback appears at most once, and one
that never appears repeats a status the call has on ``changes``. Every call whose true
lifecycle is known (``Run.truth``) is also judged by its changes: its last change is its
true final status, and no status appears twice."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from schemas.call import CallStatus
from schemas.messages import RejectReason, Source
from service.fsm import Outcome
from service.oracle import Prediction, expected_outcomes
from service.stats import percentile
from service.traffic import Delivery

# Reason phrases of the answers the service gives, for the summary's table.
REASON_PHRASES = {
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Sent:
    """One planned delivery and what became of it."""

    delivery: Delivery
    code: int | None = None  # the last answer; None: never answered
    event_id: str | None = None
    sent_at: float = 0.0  # wall clock, to compare with processedAt
    answer_s: float = 0.0
    attempts: int = 0


@dataclass
class Seen:
    topic: str  # "changes" or "rejected"
    reason: RejectReason | None
    processed_at: float
    call_id: str | None = None
    status: CallStatus | None = None
    source: Source | None = None
    # The event's receivedAt (epoch seconds): when ingest took it, so its place in the
    # call's partition. 0.0: not known (then it is taken to be before everything).
    received_at: float = 0.0


@dataclass
class Run:
    """Everything the summary is made of."""

    sent: list[Sent] = field(default_factory=list)
    expected: dict[str, Prediction] = field(default_factory=dict)  # by eventId
    uncertain_calls: set[str] = field(default_factory=set)
    seen: dict[str, list[Seen]] = field(default_factory=dict)  # by eventId
    answers: Counter[str] = field(default_factory=Counter)  # every attempt's answer
    seconds: float = 0.0
    predicted: bool = False  # expected is complete
    repeats: int = 0  # accepted deliveries of an event already accepted (same eventId)
    # Each played call's true final status (what FreeClimb's REST API ends up showing),
    # and every change read back per call, in order (those of api events too).
    truth: dict[str, CallStatus] = field(default_factory=dict)
    changes: dict[str, list[Seen]] = field(default_factory=dict)
    withheld: int = 0  # callbacks --lost never sent (each copy counted)
    unaccepted: int = 0  # callbacks never accepted after every attempt: lost at the source
    skipped_illegal: int = 0  # illegal steps not sent, the end before them never accepted
    settled_s: float | None = None  # seconds after the traffic until all was in

    def record(self, event_id: str, seen: Seen) -> None:
        """One message read back, by its eventId and (a change) by its call."""
        self.seen.setdefault(event_id, []).append(seen)
        if seen.topic == "changes" and seen.call_id is not None:
            self.changes.setdefault(seen.call_id, []).append(seen)

    def reconciled(self, call_id: str) -> bool:
        """Whether a Call resource from the REST API moved this call."""
        return any(c.source is Source.API for c in self.changes.get(call_id, ()))


def predict(run: Run) -> None:
    """The state machine's prediction for every accepted request, call by call."""
    by_call: dict[str, list[Sent]] = {}
    judged: set[str] = set()
    for sent in run.sent:
        # The eventId is derived from the body, so a delivery of the same bytes again
        # (a retry, a duplicate) is the same event: the processor judges it once.
        if sent.event_id is None:
            continue
        if sent.event_id in judged:
            run.repeats += 1
            continue
        judged.add(sent.event_id)
        by_call.setdefault(sent.delivery.call_id, []).append(sent)
    for sents in by_call.values():
        predictions = expected_outcomes([s.delivery.body for s in sents])
        for sent, prediction in zip(sents, predictions, strict=True):
            assert sent.event_id is not None
            run.expected[sent.event_id] = prediction


def outstanding(run: Run) -> int:
    """What is still to come: accepted requests whose predicted message has not been
    read yet (or, for a call the REST API moved, that neither appeared nor repeat one of
    its statuses), and calls whose last change is not their true final status yet."""
    sent_of = {s.event_id: s for s in run.sent if s.event_id is not None}
    waiting = 0
    for event_id, prediction in run.expected.items():
        if event_id in run.seen:
            continue
        sent = sent_of[event_id]
        if run.reconciled(sent.delivery.call_id):
            waiting += not _repeats_a_change(run, sent, sent.delivery.status)
        elif prediction.outcome is not Outcome.DUPLICATE:
            waiting += 1
    for call_id, final in run.truth.items():
        changes = run.changes.get(call_id)
        waiting += not changes or changes[-1].status is not final
    return waiting


# How much later than a callback's 202 an event may have been received and still have
# reached the call's partition before it: the two clocks are this host's, and a 202 is
# sent only once the callback is durable, so a second is generous.
ORDER_SLACK_S = 1.0


def _repeats_a_change(run: Run, sent: Sent, status: CallStatus) -> bool:
    """Whether an accepted callback that never appeared may be a duplicate of a change of
    the same status: only of one ingested before the callback was durable (its 202).
    One received later came after it in the call's partition, so the state machine
    judged the callback first, and it must have been published itself: a lost end
    callback then "recovered" by the reconciler is caught, not forgiven."""
    acked_at = sent.sent_at + sent.answer_s + ORDER_SLACK_S
    return any(
        c.status is status and c.received_at <= acked_at
        for c in run.changes.get(sent.delivery.call_id, ())
    )


@dataclass
class Tally:
    """How the accepted requests of a run were accounted for, and whether the run passed."""

    changes: int = 0
    rejections: Counter[str] = field(default_factory=Counter)
    duplicates_dropped: int = 0
    missing: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    server_errors: int = 0
    refused: int = 0  # 4xx: the simulated traffic is valid, so a set-up or service fault
    accepted: int = 0
    # The calls judged by their true final status (Run.truth), and what became of them.
    calls: int = 0
    reached: int = 0  # last change = the true final status
    through_api: int = 0  # of those, that last change came from the REST API
    not_reached: list[str] = field(default_factory=list)  # callIds
    repeated: list[str] = field(default_factory=list)  # callIds with a status twice

    @property
    def ok(self) -> bool:
        failed = self.missing or self.twice or self.unexpected or self.server_errors
        wrong_calls = self.not_reached or self.repeated
        return not failed and not wrong_calls and not self.refused and self.accepted > 0


def judge(run: Run) -> Tally:
    """Account for every accepted request against what was read back."""
    # A repeat of an accepted event (same bytes, same eventId) is accounted for by the
    # event it repeats: the processor drops it (rule 0).
    v = Tally(duplicates_dropped=run.repeats, accepted=run.repeats)
    sent_of = {s.event_id: s for s in run.sent if s.event_id is not None}
    v.server_errors = sum(
        n for code, n in run.answers.items() if code.startswith("5") and code != "503"
    )
    v.refused = sum(n for code, n in run.answers.items() if code.startswith("4"))
    for event_id, expected in run.expected.items():
        v.accepted += 1
        seen = run.seen.get(event_id, [])
        if len(seen) > 1:
            v.twice.append(event_id)
        for s in seen[:1]:
            if s.topic == "changes":
                v.changes += 1
            else:
                v.rejections[s.reason.value if s.reason else "?"] += 1
        sent = sent_of[event_id]
        delivery = sent.delivery
        if run.reconciled(delivery.call_id):
            # A resource moved the call: the prediction no longer holds for it, but an
            # accepted callback that never appeared must repeat a status it reached.
            if not seen:
                if _repeats_a_change(run, sent, delivery.status):
                    v.duplicates_dropped += 1
                elif delivery.call_id not in run.uncertain_calls:
                    v.missing.append(event_id)
            continue
        if not seen and expected.outcome is Outcome.DUPLICATE:
            v.duplicates_dropped += 1
        if delivery.call_id in run.uncertain_calls:
            continue  # an unanswered attempt of this call may have been ingested too
        if expected.outcome is not Outcome.DUPLICATE and not seen:
            v.missing.append(event_id)
        elif seen and not _matches(expected, seen[0]):
            v.unexpected.append(event_id)
    _judge_calls(run, v)
    return v


def _judge_calls(run: Run, v: Tally) -> None:
    """Each played call against its true lifecycle: ends at its final status, and each
    of its changes once (the state machine only moves forward, so a status seen twice is
    a change published twice)."""
    for call_id, final in run.truth.items():
        v.calls += 1
        changes = run.changes.get(call_id, [])
        statuses = [c.status for c in changes]
        if len(set(statuses)) != len(statuses):
            v.repeated.append(call_id)
        if changes and changes[-1].status is final:
            v.reached += 1
            v.through_api += changes[-1].source is Source.API
        else:
            v.not_reached.append(call_id)


def _matches(expected: Prediction, seen: Seen) -> bool:
    if expected.outcome is Outcome.ACCEPTED:
        return seen.topic == "changes"
    if expected.outcome is Outcome.REJECTED:
        return seen.topic == "rejected" and seen.reason is expected.reason
    return False  # a duplicate must not be published at all


def _calls_section(run: Run, tally: Tally) -> list[str]:
    lines = ["calls against their true lifecycle (the FreeClimb API stand-in's)"]
    lines.append(row("callbacks withheld at the source", run.withheld, "(--lost)"))
    lines.append(row("callbacks lost at the source", run.unaccepted, "(never accepted)"))
    if run.skipped_illegal:
        lines.append(row("illegal steps not sent", run.skipped_illegal, "(their end was lost)"))
    lines.append(row("reached their true final status", tally.reached, f"of {tally.calls}"))
    lines.append(row("  of those through reconciliation", tally.through_api, "(source api)"))
    if not tally.not_reached:
        lines.append(row("did not reach it", 0))
    for label, ids in (
        ("DID NOT REACH IT", tally.not_reached),
        ("A CHANGE TWICE", tally.repeated),
    ):
        if ids:
            changes = run.changes.get(ids[0], [])
            went = " > ".join(f"{c.status}" for c in changes) or "no change"
            note = f"e.g. callId {ids[0]}: {went}; truly {run.truth[ids[0]]}"
            lines.append(row(label, len(ids), note))
    if run.settled_s is not None:
        lines.append(f"  all in {run.settled_s:.1f}s after the traffic ended")
    lines.append("")
    return lines


def row(label: str, n: int, note: str = "") -> str:
    return f"  {label:<34}{n:>8}  {note}".rstrip()


def summary(run: Run, tally: Tally, calls: int, url: str) -> str:
    """The table printed at the end."""
    requests = len(run.sent)
    rate = requests / run.seconds if run.seconds else 0.0
    lines = [
        f"{calls} calls, {requests} callbacks in {run.seconds:.1f}s ({rate:.0f}/s) to {url}",
        "",
    ]
    lines.append("answers (every attempt)")
    for code, n in sorted(run.answers.items()):
        phrase = REASON_PHRASES.get(int(code), "") if code.isdigit() else ""
        lines.append(row(f"{code} {phrase}", n))
    lines.append(row("retried after 503 or no answer", sum(s.attempts - 1 for s in run.sent)))
    lines.append("")
    lines.append("outcomes of the accepted callbacks (read back, read_committed)")
    lines.append(row("changes", tally.changes))
    lines.append(row("rejections", sum(tally.rejections.values())))
    lines += [row(f"  {reason}", n) for reason, n in sorted(tally.rejections.items())]
    lines.append(row("duplicates dropped", tally.duplicates_dropped))
    wrong = set(tally.missing) | set(tally.unexpected) | set(tally.twice)
    lines.append(row("accounted for", tally.accepted - len(wrong), f"of {tally.accepted}"))
    for label, ids in (
        ("NEVER APPEARED", tally.missing),
        ("PUBLISHED TWICE", tally.twice),
        ("NOT AS PREDICTED", tally.unexpected),
    ):
        if ids:
            lines.append(row(label, len(ids), f"e.g. eventId {ids[0]}"))
    if not tally.accepted:
        lines.append("  NO CALLBACK WAS ACCEPTED: is the service running, with this secret?")
    if tally.refused:
        lines.append(row("REFUSED (4xx)", tally.refused, "see the service's log lines"))
    if run.uncertain_calls:
        lines.append(
            row("calls not checked", len(run.uncertain_calls), "(an attempt got 503 or no answer)")
        )
    lines.append("")
    if tally.calls:
        lines += _calls_section(run, tally)
    answers = [s.answer_s * 1000 for s in run.sent if s.code == 202]
    sent_at = {s.event_id: s.sent_at for s in run.sent if s.event_id}
    e2e = [
        (seen[0].processed_at - sent_at[e]) * 1000
        for e, seen in run.seen.items()
        if e in sent_at and seen
    ]
    lines.append(f"{'latency (ms)':<36}{'p50':>8}{'p95':>9}{'p99':>9}")
    for name, values in (("HTTP answer (202)", answers), ("end to end (sent -> processed)", e2e)):
        p50, p95, p99 = (percentile(values, p) for p in (50, 95, 99))
        lines.append(f"  {name:<34}{p50:>8.1f}{p95:>9.1f}{p99:>9.1f}")
    return "\n".join(lines)
