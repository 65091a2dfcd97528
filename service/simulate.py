"""``callstatus simulate``: send realistic FreeClimb callback traffic to a running service
and account for every request it accepted.

The traffic (service/traffic.py) is signed with the configured signing secret (the local
one of ``make run``) and sent at a steady rate, each call's callbacks one after the other
and many calls at once. Meanwhile the changes and rejected topics are read from their
current end with read_committed. At the end a summary is printed: requests by status
code, changes, rejections by reason, duplicates dropped, and latencies. Exit status 1
when an answer was a 5xx other than 503, or an accepted request's outcome never appeared
(or appeared twice, or not as the state machine predicts), and also when an answer was a
4xx or nothing was accepted at all (the traffic is valid: a wrong secret or URL); else 0.

The HTTP client is a few lines over asyncio streams (HTTP/1.1 keep-alive), so the
command needs nothing beyond the service's own dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from schemas.messages import RejectReason
from service import signature
from service.app import INGEST_PATH
from service.fsm import Outcome
from service.kafka import client_options, partition_counts
from service.settings import Settings, load_settings
from service.traffic import Delivery, Expected, Shares, expected_outcomes, generate_calls

# Answers FreeClimb would retry (503: the service is draining or Kafka is unavailable),
# how often and how soon; a transport error (no answer at all) is retried the same way.
RETRY_ON = frozenset({503})
ATTEMPTS = 4
BACKOFF_S = 0.25
SETTLE_S = 1.0  # reading on after the last expected outcome arrived
ANSWER_TIMEOUT_S = 30.0  # per attempt; then it counts as no answer
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


class HttpError(Exception):
    """No HTTP answer: the connection failed, closed or sent something unreadable."""


class Connection:
    """One HTTP/1.1 keep-alive connection, reopened after an error."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):  # a hung server must not hang us
                return await self._post(path, body, headers)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
            await self.close()
            raise HttpError(str(exc) or type(exc).__name__) from exc

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise asyncio.IncompleteReadError(b"", None)
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "transfer-encoding":
                raise ValueError("chunked answers are not expected from the service")
        answer = await reader.readexactly(length)
        if close:
            await self.close()
        return status, answer

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


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
    expected: dict[str, Expected] = field(default_factory=dict)  # by eventId
    uncertain_calls: set[str] = field(default_factory=set)
    seen: dict[str, list[Seen]] = field(default_factory=dict)  # by eventId
    answers: Counter[str] = field(default_factory=Counter)  # every attempt's answer
    seconds: float = 0.0
    predicted: bool = False  # expected is complete
    repeats: int = 0  # accepted deliveries of an event already accepted (same eventId)


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per quarter else."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.stream = total, stream
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._quarter = 0
        self._tty = stream.isatty()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self._tty and (now - self._drawn >= 0.1 or self.done == self.total):
            self._drawn = now
            self.stream.write("\r" + self.line(now))
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif not self._tty and self.done * 4 >= (self._quarter + 1) * self.total:
            self._quarter += 1
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        width = 30
        filled = width * self.done // max(self.total, 1)
        rate = self.done / max(now - self.started, 1e-9)
        bar = "#" * filled + "." * (width - filled)
        return f"sending [{bar}] {self.done}/{self.total} requests, {rate:.0f}/s"


class Pacer:
    """Spaces requests evenly at ``rate`` per second across all senders."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_at = time.monotonic()

    async def wait(self) -> None:
        at, self.next_at = self.next_at, max(self.next_at, time.monotonic()) + self.interval
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def send_call(
    calls: asyncio.Queue[list[Delivery]],
    conn: Connection,
    settings: Settings,
    pacer: Pacer,
    run: Run,
    progress: Progress,
) -> None:
    """Take calls off the queue and send each one's callbacks in order."""
    secret = settings.signing_secrets[0]
    while True:
        try:
            deliveries = calls.get_nowait()
        except asyncio.QueueEmpty:
            return
        for delivery in deliveries:
            sent = Sent(delivery)
            run.sent.append(sent)
            for attempt in range(ATTEMPTS):
                if attempt:
                    await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
                await pacer.wait()
                sent.attempts += 1
                sent.sent_at = time.time()
                started = time.monotonic()
                headers = {
                    "Content-Type": "application/json",
                    signature.HEADER: signature.sign(secret, int(sent.sent_at), delivery.body),
                }
                try:
                    code, answer = await conn.post(INGEST_PATH, delivery.body, headers)
                except HttpError:
                    run.answers["no answer"] += 1
                    # It may have been ingested all the same: see the 503 case below.
                    run.uncertain_calls.add(delivery.call_id)
                    continue
                sent.answer_s = time.monotonic() - started
                sent.code = code
                run.answers[str(code)] += 1
                if code == 202:
                    sent.event_id = json.loads(answer)["eventId"]
                if code not in RETRY_ON:
                    break
                # A 503 is "maybe stored" (README): this attempt may still reach the
                # processor, so the call's predictions are no longer certain.
                run.uncertain_calls.add(delivery.call_id)
            progress.step()


async def send_all(
    settings: Settings,
    url: str,
    traffic: list[list[Delivery]],
    rate: float,
    concurrency: int,
    run: Run,
) -> None:
    parts = urlsplit(url)  # checked by main()
    assert parts.hostname is not None
    calls: asyncio.Queue[list[Delivery]] = asyncio.Queue()
    for deliveries in traffic:
        calls.put_nowait(deliveries)
    progress = Progress(sum(len(d) for d in traffic))
    pacer = Pacer(rate)
    conns = [Connection(parts.hostname, parts.port or 80) for _ in range(concurrency)]
    started = time.monotonic()
    try:
        await asyncio.gather(*(send_call(calls, c, settings, pacer, run, progress) for c in conns))
    finally:
        for conn in conns:
            await conn.close()
    run.seconds = time.monotonic() - started


def _epoch(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


class Reader:
    """Reads changes and rejected with read_committed, from their ends at start-up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.options = client_options(settings)
        self.consumer = AIOKafkaConsumer(
            **self.options, isolation_level="read_committed", enable_auto_commit=False
        )

    async def start(self) -> None:
        topics = [self.settings.topic_changes, self.settings.topic_rejected]
        counts = await partition_counts(self.options, topics)
        missing = [t for t in topics if not counts.get(t)]
        if missing:
            raise RuntimeError(f"topics {missing} do not exist: is the service running?")
        await self.consumer.start()
        tps = [TopicPartition(t, p) for t in topics for p in range(counts[t])]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:  # fix the start positions now, before anything is sent
            await self.consumer.position(tp)

    async def read(self, run: Run, until: asyncio.Event, caught_up: asyncio.Event) -> None:
        """Collect outcomes until ``until`` is set; set ``caught_up`` once every accepted
        request's predicted message is in (after :func:`predict` ran)."""
        while not until.is_set():
            if run.predicted and not outstanding(run):
                caught_up.set()
            batches = await self.consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                rejected = tp.topic == self.settings.topic_rejected
                for record in records:
                    value = json.loads(record.value or b"{}")
                    reason = RejectReason(value["reason"]) if rejected else None
                    seen = Seen(
                        "rejected" if rejected else "changes", reason, _epoch(value["processedAt"])
                    )
                    run.seen.setdefault(value["eventId"], []).append(seen)

    async def stop(self) -> None:
        await self.consumer.stop()


def predict(run: Run) -> None:
    """The state machine's verdict for every accepted request, call by call."""
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
        verdicts = expected_outcomes([s.delivery.body for s in sents])
        for sent, verdict in zip(sents, verdicts, strict=True):
            assert sent.event_id is not None
            run.expected[sent.event_id] = verdict


def outstanding(run: Run) -> int:
    """Accepted requests whose predicted message has not been read yet."""
    return sum(
        1
        for event_id, verdict in run.expected.items()
        if verdict.outcome is not Outcome.DUPLICATE and event_id not in run.seen
    )


async def simulate(settings: Settings, args: argparse.Namespace) -> Run:
    shares = Shares(args.gaps, args.reorder, args.duplicates, args.retries, args.illegal)
    traffic = generate_calls(args.calls, shares, args.seed)
    url = args.url or f"http://{_client_host(settings.host)}:{settings.port}"
    run = Run()
    reader = Reader(settings)
    done = asyncio.Event()
    caught_up = asyncio.Event()
    reading: asyncio.Task[None] | None = None
    try:
        await reader.start()
        reading = asyncio.create_task(reader.read(run, done, caught_up))
        print(
            f"simulating {args.calls} calls at {args.rate:g} requests/s against {url}",
            file=sys.stderr,
        )
        await send_all(settings, url, traffic, args.rate, args.concurrency, run)
        predict(run)
        run.predicted = True
        print(
            f"waiting up to {args.wait:g}s for {outstanding(run)} outcomes ...",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(TimeoutError):  # the summary says what never came
            await asyncio.wait_for(caught_up.wait(), args.wait)
        # Read a moment longer, so a message published twice would show.
        await asyncio.sleep(SETTLE_S)
    finally:
        done.set()
        if reading is not None:
            await reading
        await reader.stop()  # also after a failed start: no consumer left open
    return run


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil without floats' rounding surprises
    return ordered[int(rank) - 1]


@dataclass
class Verdict:
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


def judge(run: Run) -> Verdict:
    """Account for every accepted request against what was read back."""
    # A repeat of an accepted event (same bytes, same eventId) is accounted for by the
    # event it repeats: the processor drops it (rule 0).
    v = Verdict(duplicates_dropped=run.repeats, accepted=run.repeats)
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


def _matches(expected: Expected, seen: Seen) -> bool:
    if expected.outcome is Outcome.ACCEPTED:
        return seen.topic == "changes"
    if expected.outcome is Outcome.REJECTED:
        return seen.topic == "rejected" and seen.reason is expected.reason
    return False  # a duplicate must not be published at all


def row(label: str, n: int, note: str = "") -> str:
    return f"  {label:<34}{n:>8}  {note}".rstrip()


def summary(run: Run, verdict: Verdict, calls: int, url: str) -> str:
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
    lines.append(row("changes", verdict.changes))
    lines.append(row("rejections", sum(verdict.rejections.values())))
    lines += [row(f"  {reason}", n) for reason, n in sorted(verdict.rejections.items())]
    lines.append(row("duplicates dropped", verdict.duplicates_dropped))
    wrong = set(verdict.missing) | set(verdict.unexpected) | set(verdict.twice)
    lines.append(row("accounted for", verdict.accepted - len(wrong), f"of {verdict.accepted}"))
    for label, ids in (
        ("NEVER APPEARED", verdict.missing),
        ("PUBLISHED TWICE", verdict.twice),
        ("NOT AS PREDICTED", verdict.unexpected),
    ):
        if ids:
            lines.append(row(label, len(ids), f"e.g. eventId {ids[0]}"))
    if not verdict.accepted:
        lines.append("  NO CALLBACK WAS ACCEPTED: is the service running, with this secret?")
    if verdict.refused:
        lines.append(row("REFUSED (4xx)", verdict.refused, "see the service's log lines"))
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=200, help="calls to simulate (200)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (100)")
    parser.add_argument("--url", help="the service's base URL (default: from CALLSTATUS_HOST/PORT)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight at once (16)")
    parser.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for outcomes (60)"
    )
    parser.add_argument("--seed", type=int, help="random seed, to repeat a run's traffic")
    defaults = Shares()
    for name, help_text in (
        ("gaps", "share of calls missing a middle step"),
        ("reorder", "share of calls with two callbacks swapped"),
        ("duplicates", "share of callbacks delivered twice"),
        ("retries", "share of callbacks re-sent as if their answer was lost"),
        ("illegal", "share of calls with an illegal step after their end"),
    ):
        default = getattr(defaults, name)
        parser.add_argument(
            f"--{name}", type=float, default=default, help=f"{help_text} ({default:g})"
        )


def main(args: argparse.Namespace) -> int:
    for name in ("calls", "concurrency"):
        if getattr(args, name) < 1:
            print(f"callstatus: --{name} must be at least 1", file=sys.stderr)
            return 2
    if args.rate <= 0 or args.wait < 0:
        print("callstatus: --rate must be above 0 and --wait at least 0", file=sys.stderr)
        return 2
    settings = load_settings()
    if not settings.signing_secrets:
        print(
            "callstatus: no signing secret: run `callstatus local-secret` "
            "or set CALLSTATUS_SIGNING_SECRETS",
            file=sys.stderr,
        )
        return 2
    try:
        Shares(args.gaps, args.reorder, args.duplicates, args.retries, args.illegal)
    except ValueError as exc:
        print(f"callstatus: {exc}", file=sys.stderr)
        return 2
    url = args.url or f"http://{_client_host(settings.host)}:{settings.port}"
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        print(f"callstatus: --url must be http://host:port, not {url!r}", file=sys.stderr)
        return 2
    try:
        run = asyncio.run(simulate(settings, args))
    except (KafkaError, RuntimeError, ValueError) as exc:  # one readable line, no traceback
        print(f"callstatus: {exc}", file=sys.stderr)
        return 2
    verdict = judge(run)
    print(summary(run, verdict, args.calls, url))
    return 0 if verdict.ok else 1
