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
dropped, and latencies. Exit status 1 when an answer was a 5xx other than 503, or an
accepted request's outcome never appeared (or appeared twice, or not as the state
machine predicts), and also when an answer was a 4xx or nothing was accepted at all (the
traffic is valid: a wrong secret or URL); else 0.

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

from schemas.messages import INGEST_PATH, RejectReason
from service import accountbook, accounts, signature
from service.httpclient import Connection, HttpError
from service.kafka import client_options, partition_counts
from service.settings import Settings, load_settings
from service.tally import Run, Seen, Sent, judge, outstanding, predict, summary
from service.traffic import Delivery, Shares, generate_calls

# Answers FreeClimb would retry (503: the service is draining or Kafka is unavailable),
# how often and how soon; a transport error (no answer at all) is retried the same way.
RETRY_ON = frozenset({503})
ATTEMPTS = 4
BACKOFF_S = 0.25
SETTLE_S = 1.0  # reading on after the last expected outcome arrived


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
    return Target(account.current_secret, f"{INGEST_PATH}/{account.id}", account.id)


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
    target: Target,
    pacer: Pacer,
    run: Run,
    progress: Progress,
) -> None:
    """Take calls off the queue and send each one's callbacks in order."""
    secret, path = target.secret, target.path
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
            progress.step()


async def send_all(
    target: Target,
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
        await asyncio.gather(*(send_call(calls, c, target, pacer, run, progress) for c in conns))
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


async def simulate(settings: Settings, target: Target, args: argparse.Namespace) -> Run:
    shares = Shares(args.gaps, args.reorder, args.duplicates, args.retries, args.illegal)
    traffic = generate_calls(args.calls, shares, args.seed, target.account_id)
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
        await send_all(target, url, traffic, args.rate, args.concurrency, run)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=200, help="calls to simulate (200)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (100)")
    parser.add_argument("--url", help="the service's base URL (default: from CALLSTATUS_HOST/PORT)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight at once (16)")
    parser.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for outcomes (60)"
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
    if args.rate <= 0 or args.wait < 0:
        print("callstatus: --rate must be above 0 and --wait at least 0", file=sys.stderr)
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
