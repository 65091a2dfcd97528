"""``callstatus simulate``: send realistic FreeClimb callback traffic to a running service
and account for every request it accepted.

The traffic (service/traffic.py) is signed as FreeClimb would sign it for one account:
with the current secret of the accounts file's account (``--account`` when it has
several; the local one-account file of ``make run``), sent to that account's
``/v1/call-status/{accountId}`` and naming it in every body; or, with the
``SIGNING_SECRETS`` shorthand bound to no account, with its first secret, to
``/v1/call-status``, each call for a random account. It is sent at a steady rate, each
call's callbacks one after the other and many calls at once. Meanwhile the changes and
rejected topics are read from their current end with read_committed. At the end a
summary is printed: requests by status code, changes, rejections by reason, duplicates
dropped, and latencies.

It also plays FreeClimb's side of each call: with an API key for the account (its
``apiKey`` in the accounts file, or ``FREECLIMB_ACCOUNT_ID``/``FREECLIMB_API_KEY``), it
runs the FreeClimb Calls API stand-in (service/standin.py) on ``--standin-port``
(127.0.0.1:8082, where ``make run`` points ``FREECLIMB_API_URL``) and moves each call
there along its true lifecycle before each callback goes (a callback lost, reordered or
skipped by a gap changes nothing there), so the service's reconciler finds what FreeClimb
would show. ``--lost F`` withholds that share of the callbacks at the source, never sent
(FreeClimb sends once); a callback not accepted after every attempt is lost at the source
too. The run then waits (``--wait``, by default RECONCILE_AFTER_SECONDS + one sweep + a
margin) until every call's last change is its true final status, and reports how many
calls got there, how many only through reconciliation (a last change of source ``api``),
and how many did not.

Exit status 1 when an answer was a 5xx other than 503, or an accepted request's outcome
never appeared (or appeared twice, or not as the state machine predicts, which is
judged only for calls no ``api`` change moved: service/tally.py), or a call did not end
at its true final status or has a change twice, and also when an answer was a 4xx or
nothing was accepted at all (the traffic is valid: a wrong secret or URL); else 0.

This module sends and reads; the run's books, the prediction and the summary are
service/tally.py's, and the HTTP client is service/httpclient.py (a few lines over
asyncio streams, so the command needs nothing beyond the service's own dependencies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from schemas.call import CallDirection, CallStatus
from schemas.messages import INGEST_PATH, RejectReason, Source
from service import accountbook, accounts, signature
from service.httpclient import Connection, HttpError
from service.kafka import client_options, partition_counts
from service.settings import Settings, load_settings
from service.standin import LOCAL_PORT, StandIn, serve
from service.tally import Run, Seen, Sent, judge, outstanding, predict, summary
from service.traffic import Delivery, Kind, Plan, Shares, generate_plans, withheld

# Answers FreeClimb would retry (503: the service is draining or Kafka is unavailable),
# how often and how soon; a transport error (no answer at all) is retried the same way.
RETRY_ON = frozenset({503})
ATTEMPTS = 4
BACKOFF_S = 0.25
SETTLE_S = 1.0  # reading on after the last expected outcome arrived
# With --lost, the default wait past RECONCILE_AFTER_SECONDS + one sweep: a round's
# tick, the fetch, the processor's batch and the read back; and the default reading on,
# at most, after everything is in: one sweep, which may publish a call again.
WAIT_MARGIN_S = 30.0
MAX_SETTLE_S = 30.0
# Every Nth request to the stand-in is answered 429 with Retry-After: 1 (FreeClimb's
# occasional throttling), so a run exercises the client's etiquette too.
THROTTLE_EVERY = 50


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


@dataclass(frozen=True, slots=True)
class Target:
    """Whose traffic a run sends: the secret it signs with, the path it posts to, and the
    account its bodies name (None: a random one per call)."""

    secret: SecretStr
    path: str
    account_id: str | None
    api_key: SecretStr | None = None  # the account's FreeClimb API key, for the stand-in


def target_of(settings: Settings, account_id: str | None) -> Target | str:
    """The run's :class:`Target` from the configured accounts, or why there is none.
    Raises :class:`~service.accountsfile.AccountsFileError` when the file cannot be loaded."""
    if settings.accounts_file is not None:
        book, _ = accounts.load(settings.accounts_file)
        where = str(settings.accounts_file)
    else:
        book = accountbook.shorthand_book(settings.signing_secrets, settings.signing_account_id)
        where = "CALLSTATUS_SIGNING_SECRETS"
    if not len(book):
        return (
            "no signing secret: run `callstatus local-secret` or set "
            "CALLSTATUS_ACCOUNTS_FILE or CALLSTATUS_SIGNING_SECRETS"
        )
    if account_id is not None:
        found = book.lookup(account_id)
        if found is None:
            return f"account {account_id} is not in {where}"
        account = found
    elif len(book) == 1:
        [account] = book
    else:
        return f"{where} has {len(book)} accounts: pass --account"
    if account.id is None:  # the shorthand bound to no account: as before accounts
        return Target(account.current_secret, INGEST_PATH, account_id)
    api_key = account.api_key
    single = settings.freeclimb_account_id
    if api_key is None and single is not None and accountbook.canonical_id(single) == account.id:
        api_key = settings.freeclimb_api_key
    return Target(account.current_secret, f"{INGEST_PATH}/{account.id}", account.id, api_key)


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


class Player:
    """FreeClimb's side of the calls: each moved on in the stand-in (when one runs) along
    its true lifecycle, and which callbacks are never sent."""

    def __init__(self, standin: StandIn | None, lost: frozenset[bytes]) -> None:
        self.standin = standin
        self.lost = lost
        self._at: dict[str, int] = {}  # callId -> index in its truth the stand-in shows
        self.ended: set[str] = set()  # calls whose end callback was accepted
        self._unsent_illegal: set[bytes] = set()  # bodies of illegal steps held back

    def play(self, plan: Plan, delivery: Delivery) -> None:
        """FreeClimb updates the call, then sends the callback: the stand-in shows at
        least the status of every callback sent (a late one, the step it swapped with
        too; a gap's skipped step too, since only its callback is missing)."""
        if self.standin is None or delivery.kind not in (Kind.STEP, Kind.LATE):
            return  # a copy's status is shown already; an illegal step is not FreeClimb's
        target = plan.truth.index(delivery.status)
        at = self._at.get(plan.call_id)
        if at is None:
            self.standin.put_call(
                plan.account_id,
                plan.call_id,
                plan.truth[0],
                direction=CallDirection(plan.direction),
                from_=plan.ends[0],
                to=plan.ends[1],
            )
            at = 0
        while at < target:
            at += 1
            self.standin.advance(plan.account_id, plan.call_id, plan.truth[at])
        self._at[plan.call_id] = at

    def unsent(self, plan: Plan, delivery: Delivery, run: Run) -> bool:
        """Whether FreeClimb never sends this callback (counted in ``run``): withheld by
        ``--lost``, or an illegal step after an end that was never accepted."""
        if delivery.body in self.lost:
            run.withheld += 1
            return True
        # A duplicate or retry of an illegal step held back is that step again: it
        # waits for the end as the step does (a withheld callback's copies are withheld
        # too). Sent regardless, it would be the first end the check below prevents.
        illegal = delivery.kind is Kind.ILLEGAL or delivery.body in self._unsent_illegal
        if illegal and plan.call_id not in self.ended:
            # A second end "after the end" only tests the state machine when the end
            # got through; in its place it would be a first end, rightly accepted, and
            # the call would end at a status FreeClimb never gave it.
            self._unsent_illegal.add(delivery.body)
            run.skipped_illegal += 1
            return True
        return False

    def answered(self, plan: Plan, delivery: Delivery, code: int | None, run: Run) -> None:
        """A callback's last answer: not a 202 after every attempt, it is lost at the
        source (FreeClimb gives up as we did); a 202 for the end lets its illegal step go."""
        if code != 202:
            run.unaccepted += 1
        elif delivery.status is plan.final and delivery.kind is not Kind.ILLEGAL:
            self.ended.add(plan.call_id)


async def send_call(
    calls: asyncio.Queue[Plan],
    conn: Connection,
    target: Target,
    pacer: Pacer,
    run: Run,
    progress: Progress,
    player: Player,
) -> None:
    """Take calls off the queue and send each one's callbacks in order."""
    secret, path = target.secret, target.path
    while True:
        try:
            plan = calls.get_nowait()
        except asyncio.QueueEmpty:
            return
        for delivery in plan.deliveries:
            player.play(plan, delivery)
            if player.unsent(plan, delivery, run):
                progress.step()
                continue
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
                    code, answer = await conn.post(path, delivery.body, headers)
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
            player.answered(plan, delivery, sent.code, run)
            progress.step()


async def send_all(
    target: Target,
    url: str,
    traffic: list[Plan],
    rate: float,
    concurrency: int,
    run: Run,
    player: Player,
) -> None:
    parts = urlsplit(url)  # checked by main()
    assert parts.hostname is not None
    calls: asyncio.Queue[Plan] = asyncio.Queue()
    for plan in traffic:
        calls.put_nowait(plan)
    progress = Progress(sum(len(plan.deliveries) for plan in traffic))
    pacer = Pacer(rate)
    conns = [Connection(parts.hostname, parts.port or 80) for _ in range(concurrency)]
    started = time.monotonic()
    try:
        await asyncio.gather(
            *(send_call(calls, c, target, pacer, run, progress, player) for c in conns)
        )
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
                        "rejected" if rejected else "changes",
                        reason,
                        _epoch(value["processedAt"]),
                        value.get("callId"),
                        CallStatus(value["status"]) if "status" in value else None,
                        Source(value["source"]) if "source" in value else None,
                        _epoch(value["receivedAt"]) if "receivedAt" in value else 0.0,
                    )
                    run.record(value["eventId"], seen)

    async def stop(self) -> None:
        await self.consumer.stop()


def wait_of(settings: Settings, args: argparse.Namespace) -> float:
    """How long to wait for the outcomes after the traffic: ``--wait``, else 60 s, or
    with ``--lost`` as long as reconciliation takes: RECONCILE_AFTER_SECONDS after a
    call's last event, one sweep for a call we never heard of, and a margin."""
    if args.wait is not None:
        return float(args.wait)
    if not args.lost:
        return 60.0
    return settings.reconcile_after_seconds + settings.reconcile_sweep_seconds + WAIT_MARGIN_S


def settle_of(settings: Settings, args: argparse.Namespace) -> float:
    """How long to read on once all is in (``--settle``): a moment, or with ``--lost``
    one sweep (at most MAX_SETTLE_S), which would show a change a sweep published twice."""
    if args.settle is not None:
        return float(args.settle)
    if not args.lost:
        return SETTLE_S
    return min(MAX_SETTLE_S, max(SETTLE_S, settings.reconcile_sweep_seconds))


async def simulate(settings: Settings, target: Target, args: argparse.Namespace) -> Run:
    shares = Shares(args.gaps, args.reorder, args.duplicates, args.retries, args.illegal)
    traffic = generate_plans(args.calls, shares, args.seed, target.account_id)
    url = args.url or f"http://{_client_host(settings.host)}:{settings.port}"
    run = Run(truth={plan.call_id: plan.final for plan in traffic})
    wait, settle = wait_of(settings, args), settle_of(settings, args)
    reader = Reader(settings)
    done = asyncio.Event()
    caught_up = asyncio.Event()
    reading: asyncio.Task[None] | None = None
    async with contextlib.AsyncExitStack() as stack:
        standin: StandIn | None = None
        if target.account_id is not None and target.api_key is not None and not args.no_standin:
            standin = StandIn({target.account_id: target.api_key.get_secret_value()})
            standin.throttle_every = args.standin_throttle
            try:
                api = await stack.enter_async_context(
                    serve(standin, "127.0.0.1", args.standin_port)
                )
            except OSError as exc:  # the port taken: another simulate runs
                raise RuntimeError(
                    f"the FreeClimb API stand-in cannot listen on 127.0.0.1:"
                    f"{args.standin_port}: {exc.strerror} (another simulate running? "
                    "--standin-port)"
                ) from exc
            print(f"FreeClimb API stand-in on {api}", file=sys.stderr)
            if settings.freeclimb_api_url.rstrip("/") != api:
                print(
                    f"callstatus: note: CALLSTATUS_FREECLIMB_API_URL is "
                    f"{settings.freeclimb_api_url}, not the stand-in: if the service uses "
                    "it too, it cannot recover what is lost",
                    file=sys.stderr,
                )
        player = Player(standin, withheld(traffic, args.lost, args.seed))
        try:
            await reader.start()
            reading = asyncio.create_task(reader.read(run, done, caught_up))
            print(
                f"simulating {args.calls} calls at {args.rate:g} requests/s against {url}"
                + (f", {args.lost:.0%} of the callbacks withheld" if args.lost else ""),
                file=sys.stderr,
            )
            await send_all(target, url, traffic, args.rate, args.concurrency, run, player)
            ended = time.monotonic()
            predict(run)
            run.predicted = True
            print(
                f"waiting up to {wait:g}s for {outstanding(run)} outcomes ...",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(TimeoutError):  # the summary says what never came
                await asyncio.wait_for(caught_up.wait(), wait)
                run.settled_s = time.monotonic() - ended
            # Read a while longer, so a message published twice would show.
            await asyncio.sleep(settle)
        finally:
            done.set()
            if reading is not None:
                await reading
            await reader.stop()  # also after a failed start: no consumer left open
    return run


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=200, help="calls to simulate (200)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (100)")
    parser.add_argument("--url", help="the service's base URL (default: from CALLSTATUS_HOST/PORT)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight at once (16)")
    parser.add_argument(
        "--wait",
        type=float,
        help="seconds to wait for outcomes after the traffic (60; with --lost, "
        "RECONCILE_AFTER_SECONDS + RECONCILE_SWEEP_SECONDS + 30)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        help="seconds to read on once everything is in, to see a message published twice "
        "(1; with --lost, one sweep, at most 30)",
    )
    parser.add_argument(
        "--lost",
        type=float,
        default=0.0,
        help="share of callbacks never sent, as lost before they reach the service: "
        "recovered only by reconciliation (0)",
    )
    parser.add_argument(
        "--standin-port",
        type=int,
        default=LOCAL_PORT,
        help=f"port of the FreeClimb API stand-in on 127.0.0.1 ({LOCAL_PORT}, where "
        "`make run` points CALLSTATUS_FREECLIMB_API_URL); it runs when the account has "
        "an API key",
    )
    parser.add_argument(
        "--no-standin", action="store_true", help="do not run the FreeClimb API stand-in"
    )
    parser.add_argument(
        "--standin-throttle",
        type=int,
        default=THROTTLE_EVERY,
        help=f"the stand-in answers every Nth request 429 with Retry-After: 1 "
        f"({THROTTLE_EVERY}; 0: never)",
    )
    parser.add_argument("--seed", type=int, help="random seed, to repeat a run's traffic")
    parser.add_argument(
        "--account",
        help="the account to send as (default: the accounts file's only account; with "
        "the shorthand bound to no account, a random one per call)",
    )
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
    if args.rate <= 0 or (args.wait is not None and args.wait < 0):
        print("callstatus: --rate must be above 0 and --wait at least 0", file=sys.stderr)
        return 2
    if not 0.0 <= args.lost <= 1.0 or (args.settle is not None and args.settle < 0):
        print("callstatus: --lost must be between 0 and 1, --settle at least 0", file=sys.stderr)
        return 2
    if not 0 <= args.standin_port <= 65535 or args.standin_throttle < 0:
        print("callstatus: bad --standin-port or --standin-throttle", file=sys.stderr)
        return 2
    settings = load_settings()
    target = target_of(settings, args.account)  # a bad accounts file: SettingsError, exit 2
    if isinstance(target, str):
        print(f"callstatus: {target}", file=sys.stderr)
        return 2
    try:
        Shares(args.gaps, args.reorder, args.duplicates, args.retries, args.illegal)
    except ValueError as exc:
        print(f"callstatus: {exc}", file=sys.stderr)
        return 2
    if args.lost and (target.account_id is None or target.api_key is None or args.no_standin):
        print(
            "callstatus: --lost needs the FreeClimb API stand-in, and so an API key for the "
            "account: apiKey in the accounts file, or CALLSTATUS_FREECLIMB_ACCOUNT_ID and "
            "CALLSTATUS_FREECLIMB_API_KEY (`make run` writes one)",
            file=sys.stderr,
        )
        return 2
    url = args.url or f"http://{_client_host(settings.host)}:{settings.port}"
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        print(f"callstatus: --url must be http://host:port, not {url!r}", file=sys.stderr)
        return 2
    try:
        run = asyncio.run(simulate(settings, target, args))
    except (KafkaError, RuntimeError, ValueError) as exc:  # one readable line, no traceback
        print(f"callstatus: {exc}", file=sys.stderr)
        return 2
    tally = judge(run)
    print(summary(run, tally, args.calls, url))
    return 0 if tally.ok else 1
