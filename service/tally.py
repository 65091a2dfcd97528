"""The books of a ``callstatus simulate`` run: what was sent and what came back
(:class:`Run`), the state machine's prediction for every accepted request
(:func:`predict`, by service/oracle.py), the :class:`Tally` of each against what was read
back (:func:`judge`), and the summary table printed at the end (:func:`summary`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from schemas.messages import RejectReason
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
    """Accepted requests whose predicted message has not been read yet."""
    return sum(
        1
        for event_id, prediction in run.expected.items()
        if prediction.outcome is not Outcome.DUPLICATE and event_id not in run.seen
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

    @property
    def ok(self) -> bool:
        failed = self.missing or self.twice or self.unexpected or self.server_errors
        return not failed and not self.refused and self.accepted > 0


def judge(run: Run) -> Tally:
    """Account for every accepted request against what was read back."""
    # A repeat of an accepted event (same bytes, same eventId) is accounted for by the
    # event it repeats: the processor drops it (rule 0).
    v = Tally(duplicates_dropped=run.repeats, accepted=run.repeats)
    call_of = {s.event_id: s.delivery.call_id for s in run.sent if s.event_id is not None}
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
        if not seen and expected.outcome is Outcome.DUPLICATE:
            v.duplicates_dropped += 1
        if call_of[event_id] in run.uncertain_calls:
            continue  # an unanswered attempt of this call may have been ingested too
        if expected.outcome is not Outcome.DUPLICATE and not seen:
            v.missing.append(event_id)
        elif seen and not _matches(expected, seen[0]):
            v.unexpected.append(event_id)
    return v


def _matches(expected: Prediction, seen: Seen) -> bool:
    if expected.outcome is Outcome.ACCEPTED:
        return seen.topic == "changes"
    if expected.outcome is Outcome.REJECTED:
        return seen.topic == "rejected" and seen.reason is expected.reason
    return False  # a duplicate must not be published at all


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
